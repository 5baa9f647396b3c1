// Package webui serves hasan's REST API: the minimal control-plane surface
// the CLI needs (cluster status, nodes, volumes, targets with LUNs, ACLs
// and CHAP, target groups and moves, fence devices and node fence
// topologies, fence history, events), plus
// /healthz, /metrics (Prometheus) and a hand-written OpenAPI 3 document at
// /api/openapi.json. The web console will be added on top of it later.
//
// The gin engine is only the Handler of an http.Server with explicit
// timeouts. Handlers bind the request, call one method of Service and
// render the result; every error goes through one table (errors.go) that
// maps cluster sentinels, *ValidationError and *NotLeaderError to an HTTP
// status and the body {"error": "...", "field": "..."}. CHAP and fence
// device secrets are accepted on input and never written back; errors on
// the fence device path are scrubbed of the request's secrets.
//
// Usage:
//
//	svc := webui.NewNodeService(node) // node is a running *cluster.Node
//	srv, err := webui.New(webui.Config{Addr: "0.0.0.0:8080", Logger: log}, svc)
//	if err != nil { ... }
//	err = srv.Run(ctx) // serves until ctx ends, then shuts down gracefully
//
// Tests drive the Handler with httptest and a fake Service.
package webui
