package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/gob"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// Network join (bootstrap): a new node has no certificate yet, so it dials
// a member's cluster port with tagBootstrap and no client certificate. The
// member first sends the CA certificate; the new node checks it against
// the hash in its token and checks that the TLS session's server
// certificate chains to that CA, and only then sends the token secret and
// its CSR. A member holding the CA key consumes the token through the
// JoinCmd path, adds the node to raft and returns the signed certificate,
// and, when the node was admitted as storage, the CA key too: every
// storage node can then admit the next join, so losing the node that ran
// `cluster init` does not freeze membership (decision 0013). Members
// without the key stop at the hello; they forward nothing.

// ErrCAMismatch: the cluster that answered is not the one the token names.
var ErrCAMismatch = errors.New("cluster: join: the member's CA does not match the token's CA hash")

// ErrNoCAKey: the member that answered a network join does not hold the
// CA key, so it cannot sign the new node's certificate.
var ErrNoCAKey = errors.New("cluster: join: this member does not hold the CA key " +
	"(print the token with `hasan cluster token` on a storage node that holds data_dir/tls/ca.key, or pass --join " +
	"with such a member's cluster address; a cluster created before storage nodes received the key copies it with " +
	"`hasan cluster ca export` and `hasan cluster ca import`)")

// ErrMemberUnreachable: the member a join dials did not answer. The token
// is consumed only when a member admits the node, so it stays good.
var ErrMemberUnreachable = errors.New("cluster: join: the member named in the token did not answer " +
	"(the token stays valid until it expires: retry with --join <cluster address of another storage member>, " +
	"or print a new token with `hasan cluster token` on a live storage node)")

// JoinTicket is what `hasan cluster token` prints:
// "hsn1.<id>.<secret>.<sha256 of the CA certificate>[@<member address>]".
// Secret is the part the state knows by its hash (JoinCmd); the CA hash
// and address are public and only let the new node find and authenticate
// the cluster.
type JoinTicket struct {
	Secret string
	CAHash string
	Addr   string
}

// String formats the ticket.
func (t JoinTicket) String() string {
	s := t.Secret
	if t.CAHash != "" {
		s += "." + t.CAHash
	}
	if t.Addr != "" {
		s += "@" + t.Addr
	}
	return s
}

// ParseJoinTicket accepts a full ticket or a bare "hsn1.<id>.<secret>"
// token (the local --via path). Errors never quote the input.
func ParseJoinTicket(s string) (JoinTicket, error) {
	s = strings.TrimSpace(s)
	var t JoinTicket
	if i := strings.IndexByte(s, '@'); i >= 0 {
		s, t.Addr = s[:i], s[i+1:]
	}
	parts := strings.Split(s, ".")
	if len(parts) != 3 && len(parts) != 4 || parts[0] != tokenPrefix || parts[1] == "" || parts[2] == "" {
		return JoinTicket{}, fmt.Errorf("%w: malformed token", ErrToken)
	}
	t.Secret = strings.Join(parts[:3], ".")
	if len(parts) == 4 {
		if b, err := hex.DecodeString(parts[3]); err != nil || len(b) != sha256.Size {
			return JoinTicket{}, fmt.Errorf("%w: malformed CA hash", ErrToken)
		}
		t.CAHash = parts[3]
	}
	return t, nil
}

// CAHash returns the hex SHA-256 of the DER of a PEM certificate.
func CAHash(caPEM []byte) (string, error) {
	c, err := parseCert(caPEM)
	if err != nil {
		return "", err
	}
	s := sha256.Sum256(c.Raw)
	return hex.EncodeToString(s[:]), nil
}

// NewNodeCSR makes the new node's key and a CSR whose CN is its id.
func NewNodeCSR(id string) (csrDER, keyPEM []byte, err error) {
	if err := validID("node id", id); err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: node key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: id, Organization: []string{"hasan"}},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: csr: %w", err)
	}
	return der, mustKeyPEM(key), nil
}

// checkCSR verifies the CSR's signature and that it names node id.
func checkCSR(csrDER []byte, id string) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("%w: csr: %w", ErrInvalid, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: csr signature: %w", ErrInvalid, err)
	}
	if csr.Subject.CommonName != id {
		return nil, fmt.Errorf("%w: csr common name %q differs from node id %q", ErrInvalid, csr.Subject.CommonName, id)
	}
	return csr, nil
}

// SignCSR issues a node certificate for the CSR's key. Only the CN is
// taken from the CSR (and must be id); the OU, SANs and usages are the
// CA's, so a CSR cannot ask for an admin certificate.
func (ca *CA) SignCSR(csrDER []byte, id string, now time.Time, validity time.Duration) ([]byte, error) {
	if err := validID("node id", id); err != nil {
		return nil, err
	}
	csr, err := checkCSR(csrDER, id)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, nodeTemplate(id, nil, now, validity), ca.cert, csr.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("cluster: node cert: %w", err)
	}
	return pemBlock("CERTIFICATE", der), nil
}

// NodeCertValidity is how long a certificate from a network join lasts.
const NodeCertValidity = 5 * 365 * 24 * time.Hour

const maxBootstrapMsg = 64 << 10

type bootstrapHello struct{ CACert []byte }

type bootstrapRequest struct {
	Secret string
	CSR    []byte
	Node   NodeInfo
}

type bootstrapResponse struct {
	Cert, CACert []byte
	// CAKey goes only to a node admitted as storage (decision 0013), so
	// that any storage node can admit the next join.
	CAKey     []byte
	Code, Msg string
}

// admitRequest travels from the CA holder to the leader (tagAdmit, a
// mutual-TLS stream like forwards).
type admitRequest struct {
	Secret string
	Node   NodeInfo
}

// JoinResult is what a network join hands the new node for its tls/.
// CAKey is set for a storage node only, and only once checked against
// CACert: the node then admits joins itself (decision 0013).
type JoinResult struct {
	CACert, Cert, Key []byte
	CAKey             []byte
}

// JoinNetwork runs the new node's side of a network join: addr is the
// member to dial (the ticket's address when empty).
func JoinNetwork(ctx context.Context, t JoinTicket, addr string, nd NodeInfo) (*JoinResult, error) {
	res, _, err := joinNetwork(ctx, t, addr, nd, nd.ID)
	return res, err
}

// joinNetwork lets tests send a CSR for another name than the node id,
// and see the member's reply as sent (before the CA key is filtered).
func joinNetwork(ctx context.Context, t JoinTicket, addr string, nd NodeInfo, csrID string) (*JoinResult, *bootstrapResponse, error) {
	if t.CAHash == "" {
		return nil, nil, fmt.Errorf("%w: the token carries no CA hash (print it with `hasan cluster token`)", ErrToken)
	}
	if addr == "" {
		addr = t.Addr
	}
	if addr == "" {
		return nil, nil, errors.New("cluster: join: no member address (token has none; pass --join)")
	}
	csr, key, err := NewNodeCSR(csrID)
	if err != nil {
		return nil, nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
	}
	c, dec, caPEM, err := dialBootstrap(ctx, addr, t.CAHash)
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	if err := gob.NewEncoder(c).Encode(bootstrapRequest{Secret: t.Secret, CSR: csr, Node: nd}); err != nil {
		return nil, nil, fmt.Errorf("cluster: join: %w", err)
	}
	var resp bootstrapResponse
	if err := dec.Decode(&resp); err != nil {
		// The member may have committed the admission before it failed.
		return nil, &resp, fmt.Errorf("cluster: join: no reply from %s (it may have admitted the node before it "+
			"failed: if `hasan cluster status` lists it, remove it with `hasan node remove` and join with a new "+
			"token; if not, retry with --join another storage member): %w", addr, err)
	}
	if err := errorFromWire(resp.Code, resp.Msg); err != nil {
		return nil, &resp, fmt.Errorf("cluster: join refused: %w", err)
	}
	if _, err := tls.X509KeyPair(resp.Cert, key); err != nil {
		return nil, &resp, fmt.Errorf("cluster: join: returned certificate: %w", err)
	}
	res := &JoinResult{CACert: caPEM, Cert: resp.Cert, Key: key}
	// The key is kept only where it belongs (a storage node) and only if
	// it is the pinned CA's: anything else is dropped, and the node
	// still has its certificate.
	if len(resp.CAKey) > 0 && nd.Role == RoleStorage {
		if _, err := LoadCA(caPEM, resp.CAKey); err == nil {
			res.CAKey = resp.CAKey
		}
	}
	return res, &resp, nil
}

// HoldsCAKey asks the member at addr, over the bootstrap stream and
// without a certificate, whether it could admit a network join: nil when
// it answered with the CA whose hash is caHash (only key holders send the
// CA in the hello), ErrNoCAKey, ErrCAMismatch or ErrMemberUnreachable
// otherwise. Nothing secret is sent; the member sees a join that stopped
// after the hello.
func HoldsCAKey(ctx context.Context, addr, caHash string) error {
	c, _, _, err := dialBootstrap(ctx, addr, caHash)
	if err != nil {
		return err
	}
	return c.Close()
}

// dialBootstrap opens the bootstrap stream to addr and checks the hello
// against caHash. It returns the connection (the caller closes it), the
// decoder that read the hello (it may hold buffered bytes) and the CA.
func dialBootstrap(ctx context.Context, addr, caHash string) (*tls.Conn, *gob.Decoder, []byte, error) {
	// The server is verified by hand below, against the CA whose hash the
	// token carries: there is no trusted root before the hello.
	d := &tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}} //nolint:gosec // verified against the token's CA hash
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: %s: %w", ErrMemberUnreachable, addr, err)
	}
	c := raw.(*tls.Conn)
	fail := func(err error) (*tls.Conn, *gob.Decoder, []byte, error) {
		c.Close()
		return nil, nil, nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte{tagBootstrap}); err != nil {
		return fail(fmt.Errorf("%w: %s: %w", ErrMemberUnreachable, addr, err))
	}
	dec := gob.NewDecoder(io.LimitReader(c, maxBootstrapMsg))
	var hello bootstrapHello
	if err := dec.Decode(&hello); err != nil {
		return fail(fmt.Errorf("%w: %s: hello: %w", ErrMemberUnreachable, addr, err))
	}
	if len(hello.CACert) == 0 {
		return fail(fmt.Errorf("%w (member %s)", ErrNoCAKey, addr))
	}
	if err := verifyBootstrapServer(c.ConnectionState(), hello.CACert, caHash); err != nil {
		return fail(err)
	}
	return c, dec, hello.CACert, nil
}

// verifyBootstrapServer: the hello's CA must hash to want, and the TLS
// peer's certificate must be a node certificate of that CA.
func verifyBootstrapServer(cs tls.ConnectionState, caPEM []byte, want string) error {
	got, err := CAHash(caPEM)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCAMismatch, err)
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(strings.ToLower(want))) != 1 {
		return ErrCAMismatch
	}
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("%w: no server certificate", ErrCAMismatch)
	}
	ca, _ := parseCert(caPEM)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, DNSName: clusterServerName,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("%w: server certificate: %w", ErrCAMismatch, err)
	}
	return nil
}

// serveBootstrap is the member's side. Nothing the client sent is logged
// but the node id.
func (n *Node) serveBootstrap(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if err := gob.NewEncoder(c).Encode(bootstrapHello{CACert: n.caCertPEM()}); err != nil || n.cfg.CA == nil {
		return // without the CA key the joiner stops at the hello
	}
	var req bootstrapRequest
	if err := gob.NewDecoder(io.LimitReader(c, maxBootstrapMsg)).Decode(&req); err != nil {
		if errors.Is(err, io.EOF) {
			// HoldsCAKey, or a joiner that found the wrong CA.
			n.log.Debug("cluster: join stopped after the hello", "remote", c.RemoteAddr())
			return
		}
		n.log.Warn("cluster: bad join request", "remote", c.RemoteAddr(), "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cert, caKey, err := n.bootstrap(ctx, &req)
	resp := bootstrapResponse{Cert: cert, CACert: n.caCertPEM(), CAKey: caKey}
	if err != nil {
		resp.Code, resp.Msg = errorCode(err), err.Error()
		n.log.Warn("cluster: network join refused", "joiner", req.Node.ID, "remote", c.RemoteAddr(), "err", err)
	} else {
		n.log.Info("cluster: node joined over the network", "joiner", req.Node.ID, "role", req.Node.Role,
			"remote", c.RemoteAddr(), "ca_key_sent", caKey != nil)
	}
	_ = gob.NewEncoder(c).Encode(resp)
}

func (n *Node) caCertPEM() []byte {
	if n.cfg.CA != nil {
		return n.cfg.CA.CertPEM
	}
	return nil
}

// bootstrap checks the CSR before anything is committed, admits the node
// (token consumed on the leader), then signs. It returns the CA key too
// when the node was admitted as storage: the JoinCmd committed only if
// the token was issued for that role, so a witness token cannot fetch
// the key by claiming storage. A node whose role is left empty (the
// token's then) gets no key.
func (n *Node) bootstrap(ctx context.Context, req *bootstrapRequest) (cert, caKey []byte, err error) {
	if n.cfg.CA == nil {
		return nil, nil, ErrNoCAKey
	}
	if err := validID("node id", req.Node.ID); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if _, err := checkCSR(req.CSR, req.Node.ID); err != nil {
		return nil, nil, err
	}
	var exists bool
	n.fsm.Read(func(s *State) { _, exists = s.Nodes[req.Node.ID] })
	if exists {
		return nil, nil, fmt.Errorf("%w: node %s", ErrExists, req.Node.ID)
	}
	// Signed before the admission so that the JoinCmd records the
	// serial, which node-remove revokes (revoke.go). A certificate whose
	// admission fails is never sent, so nobody holds it.
	cert, err = n.cfg.CA.SignCSR(req.CSR, req.Node.ID, n.cfg.Clock.Now(), NodeCertValidity)
	if err != nil {
		return nil, nil, err
	}
	info, err := ParseCertInfo(cert)
	if err != nil {
		return nil, nil, err
	}
	nd := req.Node
	nd.CertSerials = []string{info.Serial}
	if err := n.admitAnywhere(ctx, req.Secret, nd); err != nil {
		return nil, nil, err
	}
	if req.Node.Role == RoleStorage {
		caKey = n.cfg.CA.KeyPEM
	}
	return cert, caKey, nil
}

// admitAnywhere runs admit on the leader, over tagAdmit when this node
// is a follower.
// Right after an election no leader may be known; nothing has been sent
// then, so it waits (within ctx) as proposeEncoded does.
func (n *Node) admitAnywhere(ctx context.Context, secret string, nd NodeInfo) error {
	wait := 10 * time.Millisecond
	for {
		if n.IsLeader() {
			return n.admit(ctx, secret, nd)
		}
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			return n.admitRemote(ctx, string(addr), secret, nd)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (no leader before %w)", ErrNotLeader, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 200*time.Millisecond)
	}
}

func (n *Node) admitRemote(ctx context.Context, addr, secret string, nd NodeInfo) error {
	c, err := n.mux.dialTagged(ctx, addr, tagAdmit)
	if err != nil {
		return fmt.Errorf("%w: dial %s: %w", ErrNotLeader, addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := gob.NewEncoder(c).Encode(admitRequest{Secret: secret, Node: nd}); err != nil {
		return fmt.Errorf("cluster: admit: %w", err)
	}
	var resp forwardResponse
	if err := gob.NewDecoder(c).Decode(&resp); err != nil {
		return fmt.Errorf("cluster: admit: %w", err)
	}
	return errorFromWire(resp.Code, resp.Msg)
}

// serveAdmit: only members may ask the leader to admit a node (the CA
// holder after it checked the CSR).
func (n *Node) serveAdmit(c net.Conn) {
	defer c.Close()
	peer, _ := PeerID(c)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	var req admitRequest
	if err := gob.NewDecoder(io.LimitReader(c, maxBootstrapMsg)).Decode(&req); err != nil {
		n.log.Warn("cluster: bad admit request", "peer", peer, "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var err error
	switch {
	case !n.forwardAllowed(c, peer):
		err = fmt.Errorf("%w: certificate %q is neither a node nor an admin", ErrForbidden, peer)
	case !n.IsLeader():
		err = ErrNotLeader
	default:
		err = n.admit(ctx, req.Secret, req.Node)
	}
	var resp forwardResponse
	if err != nil {
		resp.Code, resp.Msg = errorCode(err), err.Error()
	}
	_ = gob.NewEncoder(c).Encode(resp)
}

// admit consumes the token (JoinCmd) and adds the node as a non-voter:
// the node is usually not running yet (it starts `hasan serve` once it has
// its certificate), and a voter that cannot answer would cost a one-node
// cluster its quorum. promoteWhenSeen makes it a voter once it answers.
func (n *Node) admit(ctx context.Context, secret string, nd NodeInfo) error {
	if _, err := n.Propose(ctx, &Command{Kind: KindJoin, Join: &JoinCmd{Hash: TokenHash(secret), Node: nd}}); err != nil {
		return err
	}
	f := n.raft.AddNonvoter(raft.ServerID(nd.ID), raft.ServerAddress(nd.RaftAddr), 0, timeoutOf(ctx))
	if err := f.Error(); err != nil {
		return fmt.Errorf("cluster: add non-voter %s: %w", nd.ID, err)
	}
	go n.promoteWhenSeen(nd.ID, nd.RaftAddr, n.cfg.Clock.Now())
	return nil
}

// promoteWhenSeen turns a joined non-voter into a voter once it has
// answered this leader's raft RPCs (contactTransport). It gives up if this
// node loses leadership or the node stays silent for a day; the operator
// then re-runs the join's AddVoter through the --via path.
func (n *Node) promoteWhenSeen(id, addr string, since time.Time) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	giveUp := time.After(24 * time.Hour)
	for {
		select {
		case <-n.done:
			return
		case <-giveUp:
			n.log.Warn("cluster: joined node never answered; left as non-voter", "joiner", id)
			return
		case <-tick.C:
		}
		if !n.IsLeader() {
			n.log.Warn("cluster: lost leadership before promoting joined node", "joiner", id)
			return
		}
		if n.lastSeenOf(id).After(since) {
			f := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, 10*time.Second)
			if err := f.Error(); err != nil {
				n.log.Warn("cluster: promote joined node", "joiner", id, "err", err)
				continue
			}
			n.log.Info("cluster: joined node promoted to voter", "joiner", id)
			return
		}
	}
}
