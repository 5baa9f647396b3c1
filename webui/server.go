package webui

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Config configures a Server. The zero value is valid: every field has a
// default, applied by New.
type Config struct {
	// Addr is the listen address (default 127.0.0.1:8080).
	Addr string
	// ReadHeaderTimeout, ReadTimeout, WriteTimeout and IdleTimeout go to
	// the http.Server unchanged (defaults 5 s, 30 s, 30 s, 120 s).
	ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout time.Duration
	// ShutdownTimeout bounds the graceful stop when Run's context ends
	// (default 5 s); after it, connections are closed.
	ShutdownTimeout time.Duration
	// MaxBodyBytes caps request bodies; bigger ones get 413 (default 1 MiB).
	MaxBodyBytes int64
	// RequestTimeout bounds each call into the Service (default 10 s).
	RequestTimeout time.Duration
	// TLS, when set, makes the server speak HTTPS only and admit only
	// clients with an administrator certificate of the cluster CA (see
	// auth.go; build it with TLSConfig). Nil means plain HTTP without
	// authentication, which New allows only on a loopback Addr.
	TLS    *tls.Config
	Logger *slog.Logger
}

// Defaults of Config.
const (
	DefaultAddr           = "127.0.0.1:8080"
	DefaultMaxBodyBytes   = 1 << 20
	DefaultRequestTimeout = 10 * time.Second
)

func (c *Config) setDefaults() error {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	def(&c.ReadHeaderTimeout, 5*time.Second)
	def(&c.ReadTimeout, 30*time.Second)
	def(&c.WriteTimeout, 30*time.Second)
	def(&c.IdleTimeout, 120*time.Second)
	def(&c.ShutdownTimeout, 5*time.Second)
	def(&c.RequestTimeout, DefaultRequestTimeout)
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	for name, d := range map[string]time.Duration{
		"ReadHeaderTimeout": c.ReadHeaderTimeout, "ReadTimeout": c.ReadTimeout,
		"WriteTimeout": c.WriteTimeout, "IdleTimeout": c.IdleTimeout,
		"ShutdownTimeout": c.ShutdownTimeout, "RequestTimeout": c.RequestTimeout,
	} {
		if d < 0 {
			return fmt.Errorf("webui: Config.%s %v must not be negative", name, d)
		}
	}
	if c.MaxBodyBytes < 0 {
		return fmt.Errorf("webui: Config.MaxBodyBytes %d must not be negative", c.MaxBodyBytes)
	}
	if c.TLS == nil && !IsLoopback(c.Addr) {
		return fmt.Errorf("webui: Config.Addr %s is not a loopback address: without Config.TLS anyone who can reach it "+
			"could change the cluster; serve TLS with administrator certificates or listen on 127.0.0.1", c.Addr)
	}
	if c.TLS != nil {
		if err := checkTLSConfig(c.TLS); err != nil {
			return err
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Server is the REST API: a gin engine used only as the Handler of an
// http.Server with explicit timeouts.
type Server struct {
	cfg  Config
	svc  Service
	log  *slog.Logger
	hs   *http.Server
	reg  *prometheus.Registry
	gin  *gin.Engine
	once sync.Once

	mu sync.Mutex
	ln net.Listener // set by Run
}

// New builds a Server serving svc. It does not listen: Run does. cfg may
// be the zero Config.
func New(cfg Config, svc Service) (*Server, error) {
	if svc == nil {
		return nil, errors.New("webui: New needs a Service")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, svc: svc, log: cfg.Logger, reg: prometheus.NewRegistry()}
	s.reg.MustRegister(newCollector(svc, cfg.RequestTimeout))
	s.gin = s.routes()
	s.hs = &http.Server{
		Addr:              cfg.Addr,
		Handler:           s.gin,
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		ReadTimeout:       cfg.ReadTimeout,
		WriteTimeout:      cfg.WriteTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		TLSConfig:         cfg.TLS,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// Handler returns the HTTP handler (tests and embedding).
func (s *Server) Handler() http.Handler { return s.gin }

// Addr returns the listening address once Run has bound it, else nil.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Run listens on Config.Addr and serves (HTTPS when Config.TLS is set)
// until ctx ends, then shuts down gracefully within
// Config.ShutdownTimeout. It returns nil after a clean stop through ctx or
// Close.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("webui: listen: %w", err)
	}
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	s.log.Info("webui: serving", "addr", ln.Addr().String(), "tls", s.cfg.TLS != nil)

	errc := make(chan error, 1)
	go func() {
		if s.cfg.TLS != nil {
			// The certificate is in TLSConfig; ServeTLS also answers a
			// plain-HTTP request with a 400 instead of a TLS alert.
			errc <- s.hs.ServeTLS(ln, "", "")
			return
		}
		errc <- s.hs.Serve(ln)
	}()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("webui: serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	if err := s.hs.Shutdown(sctx); err != nil {
		_ = s.hs.Close()
		<-errc
		return fmt.Errorf("webui: shutdown: %w", err)
	}
	<-errc
	return nil
}

// Close stops the server at once, closing every connection.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() { err = s.hs.Close() })
	return err
}

func (s *Server) routes() *gin.Engine {
	// Release mode: no debug route dump on stdout. gin keeps the mode in an
	// atomic global, so concurrent New calls are safe.
	gin.SetMode(gin.ReleaseMode)
	e := gin.New()
	e.Use(s.recoverer(), s.authenticate(), s.limitBody())
	e.HandleMethodNotAllowed = true
	e.NoRoute(func(c *gin.Context) { s.fail(c, errNoSuch("route", c.Request.URL.Path)) })
	e.NoMethod(func(c *gin.Context) {
		c.JSON(http.StatusMethodNotAllowed, errorBody{Error: "method not allowed"})
	})

	e.GET("/healthz", func(c *gin.Context) { c.JSON(http.StatusOK, gin.H{"status": "ok"}) })
	e.GET("/metrics", gin.WrapH(promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{})))
	e.GET("/api/openapi.json", func(c *gin.Context) {
		c.Data(http.StatusOK, "application/json", openAPIDoc)
	})

	v1 := e.Group("/api/v1")
	v1.GET("/cluster", s.getStatus)
	v1.PUT("/cluster/maintenance", s.putMaintenance)

	v1.GET("/nodes", s.listNodes)
	v1.GET("/nodes/:id", s.getNode)
	v1.DELETE("/nodes/:id", s.deleteNode)
	v1.PUT("/nodes/:id/state", s.putNodeState)
	v1.PUT("/nodes/:id/fence", s.putNodeFence)
	v1.POST("/nodes/:id/fence-confirm", s.confirmFence)
	v1.POST("/nodes/:id/replace", s.replaceNode)
	v1.POST("/certs/revoke", s.postCertRevoke)

	v1.GET("/volumes", s.listVolumes)
	v1.POST("/volumes", s.createVolume)
	v1.GET("/volumes/:uuid", s.getVolume)
	v1.DELETE("/volumes/:uuid", s.deleteVolume)
	v1.POST("/volumes/:uuid/replicas", s.postVolumeReplicas)

	v1.GET("/targets", s.listTargets)
	v1.POST("/targets", s.createTarget)
	v1.GET("/targets/:iqn", s.getTarget)
	v1.DELETE("/targets/:iqn", s.deleteTarget)
	v1.PUT("/targets/:iqn/luns/:lun", s.putLUN)
	v1.DELETE("/targets/:iqn/luns/:lun", s.deleteLUN)
	v1.PUT("/targets/:iqn/acl", s.putACL)
	v1.PUT("/targets/:iqn/chap", s.putCHAP)

	v1.GET("/groups", s.listGroups)
	v1.POST("/groups", s.createGroup)
	v1.GET("/groups/:name", s.getGroup)
	v1.POST("/groups/:name/move", s.moveGroup)

	v1.GET("/fence-devices", s.listFenceDevices)
	v1.GET("/fence-devices/:name", s.getFenceDevice)
	v1.PUT("/fence-devices/:name", s.putFenceDevice)
	v1.DELETE("/fence-devices/:name", s.deleteFenceDevice)

	v1.GET("/fence-history", s.listFenceHistory)
	v1.GET("/events", s.listEvents)
	return e
}

// recoverer keeps a panicking handler's fault inside its request: 500 with
// no detail to the client, the panic in the log.
func (s *Server) recoverer() gin.HandlerFunc {
	return func(c *gin.Context) {
		defer func() {
			if r := recover(); r != nil {
				s.log.Error("webui: handler panic", "path", c.FullPath(), "panic", r)
				c.AbortWithStatusJSON(http.StatusInternalServerError, errorBody{Error: "internal error"})
			}
		}()
		c.Next()
	}
}

func (s *Server) limitBody() gin.HandlerFunc {
	return func(c *gin.Context) {
		if c.Request.ContentLength > s.cfg.MaxBodyBytes {
			c.AbortWithStatusJSON(http.StatusRequestEntityTooLarge, errorBody{Error: "request body too large"})
			return
		}
		c.Request.Body = http.MaxBytesReader(c.Writer, c.Request.Body, s.cfg.MaxBodyBytes)
		c.Next()
	}
}

// fail writes err through the error table.
func (s *Server) fail(c *gin.Context, err error) {
	status, body, leader := statusOf(err)
	if leader != "" {
		c.Header(LeaderHeader, leader)
	}
	if status >= 500 {
		s.log.Warn("webui: request failed", "method", c.Request.Method, "path", c.Request.URL.Path, "status", status, "err", err)
	}
	c.AbortWithStatusJSON(status, body)
}
