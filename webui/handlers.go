package webui

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/gin-gonic/gin"

	"github.com/hasan-storage/hasan/cluster"
)

// bind decodes the JSON body into v. Unknown fields are refused so a typo
// in a field name is a 400, not a silently ignored setting.
func bind(c *gin.Context, v any) error { return decodeJSON(c.Request.Body, v) }

// decodeJSON is bind on any reader: exactly one JSON value, no unknown
// fields, errors as *ValidationError naming the field.
func decodeJSON(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var (
			se *json.SyntaxError
			te *json.UnmarshalTypeError
			mb *http.MaxBytesError
		)
		switch {
		case errors.As(err, &mb):
			return err
		case errors.Is(err, io.EOF):
			return invalid("body", "a JSON body is required")
		case errors.As(err, &se):
			return invalid("body", "invalid JSON at offset %d: %v", se.Offset, se)
		case errors.As(err, &te):
			return invalid(te.Field, "want %s, got JSON %s", te.Type, te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return invalid(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`), "unknown field")
		default:
			return invalid("body", "invalid JSON: %v", err)
		}
	}
	if dec.More() {
		return invalid("body", "trailing data after the JSON value")
	}
	return nil
}

// ctx bounds a service call by Config.RequestTimeout and the client.
func (s *Server) ctx(c *gin.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Request.Context(), s.cfg.RequestTimeout)
}

// reply runs a service call and writes its result or error.
func reply[T any](s *Server, c *gin.Context, status int, call func(context.Context) (T, error)) {
	ctx, cancel := s.ctx(c)
	defer cancel()
	v, err := call(ctx)
	if err != nil {
		s.fail(c, err)
		return
	}
	c.JSON(status, v)
}

// done runs a call that returns nothing and answers 204.
func done(s *Server, c *gin.Context, call func(context.Context) error) {
	ctx, cancel := s.ctx(c)
	defer cancel()
	if err := call(ctx); err != nil {
		s.fail(c, err)
		return
	}
	c.Status(http.StatusNoContent)
}

func required(field, v string) error {
	if strings.TrimSpace(v) == "" {
		return invalid(field, "required")
	}
	return nil
}

func queryLimit(c *gin.Context) (int, error) {
	q := c.Query("limit")
	if q == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(q)
	if err != nil || n < 0 {
		return 0, invalid("limit", "want a non-negative integer, got %q", q)
	}
	return n, nil
}

// --- cluster and nodes ---

func (s *Server) getStatus(c *gin.Context) { reply(s, c, http.StatusOK, s.svc.Status) }

type maintenanceReq struct {
	On *bool `json:"on"`
}

func (s *Server) putMaintenance(c *gin.Context) {
	var req maintenanceReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if req.On == nil {
		s.fail(c, invalid("on", "required"))
		return
	}
	done(s, c, func(ctx context.Context) error { return s.svc.SetMaintenance(ctx, *req.On) })
}

func (s *Server) listNodes(c *gin.Context) { reply(s, c, http.StatusOK, s.svc.Nodes) }

func (s *Server) getNode(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) (cluster.NodeInfo, error) {
		return s.svc.Node(ctx, c.Param("id"))
	})
}

func (s *Server) deleteNode(c *gin.Context) {
	done(s, c, func(ctx context.Context) error { return s.svc.RemoveNode(ctx, c.Param("id")) })
}

type nodeStateReq struct {
	State cluster.NodeState `json:"state"`
}

// settableStates are the node states an operator may set; fenced is only
// ever set by a confirmed takeover.
var settableStates = []cluster.NodeState{cluster.NodeOnline, cluster.NodeStandby, cluster.NodeMaintenance}

func (s *Server) putNodeState(c *gin.Context) {
	var req nodeStateReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if !slices.Contains(settableStates, req.State) {
		s.fail(c, invalid("state", "want online, standby or maintenance, got %q", req.State))
		return
	}
	done(s, c, func(ctx context.Context) error { return s.svc.SetNodeState(ctx, c.Param("id"), req.State) })
}

// --- volumes ---

func (s *Server) listVolumes(c *gin.Context) { reply(s, c, http.StatusOK, s.svc.Volumes) }

func (s *Server) getVolume(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) (cluster.Volume, error) {
		return s.svc.Volume(ctx, c.Param("uuid"))
	})
}

func (s *Server) createVolume(c *gin.Context) {
	var spec VolumeSpec
	if err := bind(c, &spec); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("name", spec.Name); err != nil {
		s.fail(c, err)
		return
	}
	if spec.Size <= 0 {
		s.fail(c, invalid("size", "must be a positive number of bytes"))
		return
	}
	if len(spec.Replicas) == 0 {
		s.fail(c, invalid("replicas", "at least one node is required"))
		return
	}
	reply(s, c, http.StatusCreated, func(ctx context.Context) (cluster.Volume, error) {
		return s.svc.CreateVolume(ctx, spec)
	})
}

func (s *Server) deleteVolume(c *gin.Context) {
	done(s, c, func(ctx context.Context) error { return s.svc.DeleteVolume(ctx, c.Param("uuid")) })
}

// --- targets ---

// chapIn is a CHAP account as a client sends it: the secret is accepted
// here and never written back.
type chapIn struct {
	User   string `json:"user"`
	Secret string `json:"secret"`
}

func (ci *chapIn) toCluster() *cluster.CHAP {
	if ci == nil {
		return nil
	}
	return &cluster.CHAP{User: ci.User, Secret: cluster.Secret(ci.Secret)}
}

// chapOut shows that an account exists, never its secret.
type chapOut struct {
	User      string `json:"user"`
	SecretSet bool   `json:"secret_set"`
}

func chapView(ch *cluster.CHAP) *chapOut {
	if ch == nil {
		return nil
	}
	return &chapOut{User: ch.User, SecretSet: ch.Secret != ""}
}

// targetView is a target as the API shows it. It is a separate type so
// that a field added to cluster.Target later cannot leak by default.
type targetView struct {
	IQN        string            `json:"iqn"`
	Alias      string            `json:"alias,omitempty"`
	LUNs       map[uint64]string `json:"luns"`
	ACL        []string          `json:"acl"`
	CHAP       *chapOut          `json:"chap,omitempty"`
	MutualCHAP *chapOut          `json:"mutual_chap,omitempty"`
}

func viewTarget(t cluster.Target) targetView {
	v := targetView{IQN: t.IQN, Alias: t.Alias, LUNs: t.LUNs, ACL: t.ACL, CHAP: chapView(t.CHAP), MutualCHAP: chapView(t.MutualCHAP)}
	if v.LUNs == nil {
		v.LUNs = map[uint64]string{}
	}
	if v.ACL == nil {
		v.ACL = []string{}
	}
	return v
}

func (s *Server) listTargets(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) ([]targetView, error) {
		ts, err := s.svc.Targets(ctx)
		out := make([]targetView, 0, len(ts))
		for _, t := range ts {
			out = append(out, viewTarget(t))
		}
		return out, err
	})
}

func (s *Server) getTarget(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) (targetView, error) {
		t, err := s.svc.Target(ctx, c.Param("iqn"))
		return viewTarget(t), err
	})
}

type targetReq struct {
	IQN        string            `json:"iqn"`
	Alias      string            `json:"alias,omitempty"`
	LUNs       map[uint64]string `json:"luns,omitempty"`
	ACL        []string          `json:"acl,omitempty"`
	CHAP       *chapIn           `json:"chap,omitempty"`
	MutualCHAP *chapIn           `json:"mutual_chap,omitempty"`
}

func (s *Server) createTarget(c *gin.Context) {
	var req targetReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("iqn", req.IQN); err != nil {
		s.fail(c, err)
		return
	}
	t := cluster.Target{IQN: req.IQN, Alias: req.Alias, LUNs: req.LUNs, ACL: req.ACL,
		CHAP: req.CHAP.toCluster(), MutualCHAP: req.MutualCHAP.toCluster()}
	reply(s, c, http.StatusCreated, func(ctx context.Context) (targetView, error) {
		if err := s.svc.CreateTarget(ctx, t); err != nil {
			return targetView{}, err
		}
		got, err := s.svc.Target(ctx, t.IQN)
		return viewTarget(got), err
	})
}

func (s *Server) deleteTarget(c *gin.Context) {
	done(s, c, func(ctx context.Context) error { return s.svc.DeleteTarget(ctx, c.Param("iqn")) })
}

func lunParam(c *gin.Context) (uint64, error) {
	n, err := strconv.ParseUint(c.Param("lun"), 10, 64)
	if err != nil || n > 16383 {
		// 16383 is the largest LUN of the flat/peripheral addressing the
		// target implements.
		return 0, invalid("lun", "want an integer 0..16383, got %q", c.Param("lun"))
	}
	return n, nil
}

type lunReq struct {
	Volume string `json:"volume"`
}

func (s *Server) putLUN(c *gin.Context) {
	lun, err := lunParam(c)
	if err != nil {
		s.fail(c, err)
		return
	}
	var req lunReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("volume", req.Volume); err != nil {
		s.fail(c, err)
		return
	}
	done(s, c, func(ctx context.Context) error { return s.svc.AddLUN(ctx, c.Param("iqn"), lun, req.Volume) })
}

func (s *Server) deleteLUN(c *gin.Context) {
	lun, err := lunParam(c)
	if err != nil {
		s.fail(c, err)
		return
	}
	done(s, c, func(ctx context.Context) error { return s.svc.RemoveLUN(ctx, c.Param("iqn"), lun) })
}

type aclReq struct {
	Initiators []string `json:"initiators"`
}

func (s *Server) putACL(c *gin.Context) {
	var req aclReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	for i, name := range req.Initiators {
		if err := required(fmt.Sprintf("initiators[%d]", i), name); err != nil {
			s.fail(c, err)
			return
		}
	}
	done(s, c, func(ctx context.Context) error { return s.svc.SetACL(ctx, c.Param("iqn"), req.Initiators) })
}

type chapReq struct {
	CHAP       *chapIn `json:"chap"`
	MutualCHAP *chapIn `json:"mutual_chap"`
}

func (s *Server) putCHAP(c *gin.Context) {
	var req chapReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if req.MutualCHAP != nil && req.CHAP == nil {
		s.fail(c, invalid("mutual_chap", "needs chap: mutual CHAP authenticates the target after the initiator"))
		return
	}
	done(s, c, func(ctx context.Context) error {
		return s.svc.SetCHAP(ctx, c.Param("iqn"), req.CHAP.toCluster(), req.MutualCHAP.toCluster())
	})
}

// --- groups ---

func (s *Server) listGroups(c *gin.Context) { reply(s, c, http.StatusOK, s.svc.Groups) }

func (s *Server) getGroup(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) (cluster.Group, error) {
		return s.svc.Group(ctx, c.Param("name"))
	})
}

type groupReq struct {
	Name      string   `json:"name"`
	VIPs      []string `json:"vips"`
	Targets   []string `json:"targets"`
	Preferred []string `json:"preferred,omitempty"`
	Failback  bool     `json:"failback,omitempty"`
}

func (s *Server) createGroup(c *gin.Context) {
	var req groupReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("name", req.Name); err != nil {
		s.fail(c, err)
		return
	}
	g := cluster.Group{Name: req.Name, VIPs: req.VIPs, Targets: req.Targets, Preferred: req.Preferred, Failback: req.Failback}
	reply(s, c, http.StatusCreated, func(ctx context.Context) (cluster.Group, error) {
		if err := s.svc.CreateGroup(ctx, g); err != nil {
			return cluster.Group{}, err
		}
		return s.svc.Group(ctx, g.Name)
	})
}

type moveReq struct {
	To string `json:"to"`
}

func (s *Server) moveGroup(c *gin.Context) {
	var req moveReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("to", req.To); err != nil {
		s.fail(c, err)
		return
	}
	// 202: the move is committed, the owner's drain and the grant follow.
	ctx, cancel := s.ctx(c)
	defer cancel()
	if err := s.svc.MoveGroup(ctx, c.Param("name"), req.To); err != nil {
		s.fail(c, err)
		return
	}
	c.Status(http.StatusAccepted)
}

// --- history ---

func (s *Server) listFenceHistory(c *gin.Context) {
	limit, err := queryLimit(c)
	if err != nil {
		s.fail(c, err)
		return
	}
	reply(s, c, http.StatusOK, func(ctx context.Context) (any, error) {
		r, err := s.svc.FenceHistory(ctx, c.Query("node"), limit)
		if r == nil {
			return []struct{}{}, err
		}
		return r, err
	})
}

func (s *Server) listEvents(c *gin.Context) {
	limit, err := queryLimit(c)
	if err != nil {
		s.fail(c, err)
		return
	}
	reply(s, c, http.StatusOK, func(ctx context.Context) (any, error) {
		ev, err := s.svc.Events(ctx, limit)
		if ev == nil {
			return []struct{}{}, err
		}
		return ev, err
	})
}

// --- replica sets ---

// replicas returns the ReplicaService, or answers 501.
func (s *Server) replicas(c *gin.Context) (ReplicaService, bool) {
	rs, ok := s.svc.(ReplicaService)
	if !ok {
		c.JSON(http.StatusNotImplemented, errorBody{Error: "this server cannot change replica sets"})
	}
	return rs, ok
}

func (s *Server) postVolumeReplicas(c *gin.Context) {
	rs, ok := s.replicas(c)
	if !ok {
		return
	}
	var req ReplicasRequest
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if req.Remove == "" && req.Add == "" {
		s.fail(c, invalid("body", "give remove, add, or both (remove and add replace one node by another)"))
		return
	}
	reply(s, c, http.StatusOK, func(ctx context.Context) (cluster.Volume, error) {
		return rs.SetVolumeReplicas(ctx, c.Param("uuid"), req)
	})
}

func (s *Server) replaceNode(c *gin.Context) {
	rs, ok := s.replicas(c)
	if !ok {
		return
	}
	var req ReplaceNodeRequest
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if err := required("with", req.With); err != nil {
		s.fail(c, err)
		return
	}
	if req.With == c.Param("id") {
		s.fail(c, invalid("with", "node %s cannot replace itself", req.With))
		return
	}
	reply(s, c, http.StatusOK, func(ctx context.Context) (ReplaceNodeResult, error) {
		return rs.ReplaceNode(ctx, c.Param("id"), req)
	})
}

// --- certificates ---

func (s *Server) postCertRevoke(c *gin.Context) {
	cs, ok := s.svc.(CertService)
	if !ok {
		c.JSON(http.StatusNotImplemented, errorBody{Error: "this server cannot revoke certificates"})
		return
	}
	var req RevokeCertRequest
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	if req.Serial == "" {
		s.fail(c, invalid("serial", "give the certificate's serial (hasan cluster cert --admin printed it; openssl x509 -serial shows it)"))
		return
	}
	reply(s, c, http.StatusOK, func(ctx context.Context) (RevokeCertResult, error) {
		return cs.RevokeCert(ctx, req)
	})
}
