// Package webui will own the gin HTTP server: the REST API, the embedded web
// console, /metrics and the OpenAPI document.
//
// Nothing is implemented yet; the package exists so the layout matches the
// product card.
package webui
