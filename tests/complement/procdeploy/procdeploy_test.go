package procdeploy

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA makes a CA shaped like Complement's (RSA, PKCS#1 PEM key).
func testCA(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
}

func TestIssuedCertificateVerifiesAgainstCA(t *testing.T) {
	certPEM, keyPEM := testCA(t)
	ca, err := parseCA(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	crt, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := ca.issue("hs1", net.ParseIP("127.1.2.2"), crt, key); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(crt)
	block, _ := pem.Decode(raw)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	for _, name := range []string{"hs1", "127.1.2.2"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("certificate does not verify for %s: %v", name, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "hs2", Roots: roots}); err == nil {
		t.Error("certificate verifies for hs2")
	}
	if st, _ := os.Stat(key); st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v", st.Mode().Perm())
	}
}

func TestSigningKeyFormatAndKeptAcrossCalls(t *testing.T) {
	path := filepath.Join(t.TempDir(), "signing.key")
	if err := writeSigningKey(path); err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(path)
	fields := strings.Fields(string(first))
	if len(fields) != 3 || fields[0] != "ed25519" || !strings.HasPrefix(fields[1], "a_") {
		t.Fatalf("unexpected signing key line %q", first)
	}
	seed, err := base64.RawStdEncoding.DecodeString(fields[2])
	if err != nil || len(seed) != 32 {
		t.Fatalf("seed: %v, %d bytes", err, len(seed))
	}
	if err := writeSigningKey(path); err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(path)
	if !bytes.Equal(first, second) {
		t.Error("signing key was rewritten")
	}
}

// dnsQuery builds a query for name/type with the given ID.
func dnsQuery(id uint16, name string, qtype uint16) []byte {
	q := make([]byte, 12)
	binary.BigEndian.PutUint16(q[0:2], id)
	binary.BigEndian.PutUint16(q[2:4], 0x0100) // RD
	binary.BigEndian.PutUint16(q[4:6], 1)
	for _, l := range strings.Split(name, ".") {
		q = append(q, byte(len(l)))
		q = append(q, l...)
	}
	q = append(q, 0, byte(qtype>>8), byte(qtype), 0, 1)
	return q
}

func TestNXDOMAINResponse(t *testing.T) {
	q := dnsQuery(0xBEEF, "_matrix-fed._tcp.hs2", 33)
	resp, name, qtype, err := nxdomainResponse(q)
	if err != nil {
		t.Fatal(err)
	}
	if name != "_matrix-fed._tcp.hs2" || qtype != 33 {
		t.Errorf("parsed %q type %d", name, qtype)
	}
	if binary.BigEndian.Uint16(resp[0:2]) != 0xBEEF {
		t.Error("ID not echoed")
	}
	flags := binary.BigEndian.Uint16(resp[2:4])
	if flags&0x8000 == 0 || flags&0x000F != 3 || flags&0x0100 == 0 {
		t.Errorf("flags %#04x: want QR, RD and RCODE 3", flags)
	}
	if !bytes.Equal(resp[12:], q[12:]) {
		t.Error("question not echoed")
	}
	if _, _, _, err := nxdomainResponse(resp); err == nil {
		t.Error("a response was accepted as a query")
	}
	if _, _, _, err := nxdomainResponse(q[:15]); err == nil {
		t.Error("a truncated query was accepted")
	}
}

func TestDNSStubAnswersOverUDP(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("binding port 53 needs root")
	}
	stub, err := startDNSStub("127.211.77.1", nil)
	if err != nil {
		t.Skipf("cannot bind the stub: %v", err)
	}
	defer stub.Close()
	conn, err := net.Dial("udp", "127.211.77.1:53")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write(dnsQuery(7, "hs1", 1)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint16(buf[2:4])&0xF != 3 || n < 12 {
		t.Errorf("not an NXDOMAIN answer: % x", buf[:n])
	}
	if got := stub.Queries()["A hs1"]; got != 1 {
		t.Errorf("queries recorded: %v", stub.Queries())
	}
}

func TestMergeConfig(t *testing.T) {
	base := map[string]any{
		"a": map[string]any{"x": 1, "y": 2},
		"b": []any{1, 2},
		"c": "keep",
		"d": "drop",
	}
	var extra map[string]any
	_ = json.Unmarshal([]byte(`{"a": {"y": 3, "z": 4}, "b": [9], "d": null}`), &extra)
	got := mergeConfig(base, extra)
	want := `{"a":{"x":1,"y":3,"z":4},"b":[9],"c":"keep"}`
	raw, _ := json.Marshal(got)
	if string(raw) != want {
		t.Errorf("got %s want %s", raw, want)
	}
}

func TestAddressesAndHostsFile(t *testing.T) {
	m := &Manager{settings: Settings{ComplementHostname: "host.docker.internal"}}
	d := &Deployment{m: m, subnet: "127.150.3", hosts: filepath.Join(t.TempDir(), "hosts")}
	for name, want := range map[string]string{"hs1": "127.150.3.2", "hs2": "127.150.3.3", "hs9": "127.150.3.10"} {
		if got, err := d.ipFor(name); err != nil || got != want {
			t.Errorf("ipFor(%s) = %s, %v; want %s", name, got, err, want)
		}
	}
	for _, bad := range []string{"hs0", "hs10", "hs01", "host.docker.internal", "hs1.example"} {
		if _, err := d.ipFor(bad); err == nil {
			t.Errorf("ipFor(%s) accepted", bad)
		}
	}
	if err := d.writeHosts(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(d.hosts)
	for _, line := range []string{"127.0.0.1\thost.docker.internal", "127.150.3.2\ths1", "127.150.3.3\ths2"} {
		if !strings.Contains(string(raw), line+"\n") {
			t.Errorf("hosts file lacks %q:\n%s", line, raw)
		}
	}
}

func TestHomeserverConfig(t *testing.T) {
	m := &Manager{settings: Settings{EnableModule: true}}
	hs := &Homeserver{Name: "hs1", IP: "127.9.9.2", Dir: "/x", LogPath: "/l", seed: "s", m: m}
	cfg := homeserverConfig(hs, &m.settings, map[string]any{"name": "sqlite3"})
	checks := map[string]any{
		"server_name":                "hs1",
		"registration_shared_secret": "complement",
		"default_room_version":       "10",
	}
	for k, want := range checks {
		if cfg[k] != want {
			t.Errorf("%s = %v, want %v", k, cfg[k], want)
		}
	}
	if mods, _ := cfg["modules"].([]any); len(mods) != 1 {
		t.Errorf("module not enabled: %v", cfg["modules"])
	}
	m.settings.EnableModule = false
	if _, ok := homeserverConfig(hs, &m.settings, nil)["modules"]; ok {
		t.Error("module enabled for stock")
	}
	raw, _ := json.Marshal(cfg)
	for _, s := range []string{`"bind_addresses":["127.9.9.2"]`, `"port":8448`, `"tls":true`, `"federation_custom_ca_list":["/x/complement-ca.crt"]`} {
		if !strings.Contains(string(raw), s) {
			t.Errorf("config lacks %s", s)
		}
	}
}

func TestPostgresParams(t *testing.T) {
	args, err := pgParams("postgresql://fj:pw@127.0.0.1:5432/postgres", "complement_x")
	if err != nil {
		t.Fatal(err)
	}
	if args["user"] != "fj" || args["password"] != "pw" || args["host"] != "127.0.0.1" || args["port"] != "5432" || args["database"] != "complement_x" {
		t.Errorf("args %v", args)
	}
	if _, err := pgParams("mysql://x", "y"); err == nil {
		t.Error("accepted a non-PostgreSQL DSN")
	}
}
