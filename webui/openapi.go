package webui

import _ "embed"

// openAPIDoc is the hand-written OpenAPI 3 description of the routes in
// server.go; TestOpenAPICoversRoutes keeps the two in step.
//
//go:embed openapi.json
var openAPIDoc []byte
