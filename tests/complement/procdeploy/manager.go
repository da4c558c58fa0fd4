package procdeploy

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log"
	"math/big"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/matrix-org/complement/ct"
)

// Manager owns every deployment of one test package (one test binary): the
// stub DNS server, the shared resolv.conf, and (with dirty runs) the one
// deployment that tests share.
type Manager struct {
	settings    Settings
	ca          *certAuthority
	extraConfig map[string]any
	runID       string
	runDir      string // data of this run (removed at Close unless KeepData)
	logDir      string // homeserver logs (kept)
	resolvPath  string
	base        [2]int // the run's 127.A.B: DNS at 127.A.B.1, deployment k at 127.A.(B+k)
	dns         *dnsStub
	dnsLog      *os.File
	spawnCh     chan spawnRequest

	mu      sync.Mutex
	nextID  int
	live    map[*Deployment]struct{}
	dirtyD  *Deployment
	started time.Time
}

// NewManager checks the settings, picks the run's loopback addresses and starts
// the stub DNS server.
func NewManager(s Settings) (*Manager, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	if _, err := os.Stat("/usr/bin/unshare"); err != nil {
		if _, err2 := os.Stat("/bin/unshare"); err2 != nil {
			return nil, fmt.Errorf("procdeploy needs unshare(1) (util-linux) to give each homeserver its own /etc/hosts")
		}
	}
	ca, err := parseCA(s.CACertPEM, s.CAKeyPEM)
	if err != nil {
		return nil, err
	}
	extra, err := readExtraConfig(s.ExtraConfigFile)
	if err != nil {
		return nil, err
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	m := &Manager{
		settings:    s,
		ca:          ca,
		extraConfig: extra,
		runID:       s.Namespace + "-" + hex.EncodeToString(rnd[:]),
		live:        map[*Deployment]struct{}{},
		spawnCh:     make(chan spawnRequest),
		started:     time.Now(),
	}
	root := s.WorkDir
	if root == "" {
		root, err = os.MkdirTemp("", "fastjoin-complement-")
		if err != nil {
			return nil, err
		}
	}
	m.runDir = filepath.Join(root, "data", m.runID)
	m.logDir = filepath.Join(root, "logs")
	for _, d := range []string{m.runDir, m.logDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := m.startDNS(); err != nil {
		return nil, err
	}
	m.resolvPath = filepath.Join(m.runDir, "resolv.conf")
	resolv := fmt.Sprintf("# procdeploy stub resolver: answers NXDOMAIN to everything\nnameserver 127.%d.%d.1\noptions timeout:1 attempts:1\n", m.base[0], m.base[1])
	if err := os.WriteFile(m.resolvPath, []byte(resolv), 0o644); err != nil {
		m.dns.Close()
		return nil, err
	}
	go m.spawner()
	m.logf("run %s: homeservers on 127.%d.%d+k.0/24, data in %s, logs in %s, python %s, module %v, db %s",
		m.runID, m.base[0], m.base[1], m.runDir, m.logDir, s.Python, s.EnableModule, s.Database)
	return m, nil
}

func (m *Manager) startDNS() error {
	var err error
	m.dnsLog, err = os.OpenFile(filepath.Join(m.logDir, m.settings.Namespace+"-dns.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	tries := 20
	if m.settings.Subnet != "" {
		tries = 1
	}
	for i := 0; i < tries; i++ {
		if m.settings.Subnet != "" {
			parts := strings.Split(m.settings.Subnet, ".")
			m.base[0], _ = strconv.Atoi(parts[1])
			m.base[1], _ = strconv.Atoi(parts[2])
		} else {
			a, _ := rand.Int(rand.Reader, big.NewInt(150))
			b, _ := rand.Int(rand.Reader, big.NewInt(200))
			m.base = [2]int{int(a.Int64()) + 100, int(b.Int64())}
		}
		ip := fmt.Sprintf("127.%d.%d.1", m.base[0], m.base[1])
		m.dns, err = startDNSStub(ip, m.dnsLog)
		if err == nil {
			return nil
		}
	}
	m.dnsLog.Close()
	return fmt.Errorf("starting the stub DNS server on 127.%d.%d.1:53: %w (root is needed to bind port 53)", m.base[0], m.base[1], err)
}

func (m *Manager) logf(format string, args ...any) {
	log.Printf("procdeploy: "+format, args...)
}

// Deploy returns a deployment with homeservers hs1..hsN running. With dirty
// runs the package's one deployment is returned, grown to N homeservers if
// needed; otherwise a fresh one. Any failure fails the test.
func (m *Manager) Deploy(t ct.TestLike, numServers int) *Deployment {
	t.Helper()
	if numServers < 1 {
		ct.Fatalf(t, "Deploy: need at least one homeserver, got %d", numServers)
	}
	t0 := time.Now()
	var d *Deployment
	if m.settings.Dirty {
		m.mu.Lock()
		if m.dirtyD == nil {
			var err error
			if m.dirtyD, err = m.newDeployment(true); err != nil {
				m.mu.Unlock()
				ct.Fatalf(t, "Deploy: %s", err)
			}
		}
		d = m.dirtyD
		m.mu.Unlock()
	} else {
		var err error
		m.mu.Lock()
		d, err = m.newDeployment(false)
		m.mu.Unlock()
		if err != nil {
			ct.Fatalf(t, "Deploy: %s", err)
		}
	}
	if err := d.ensure(numServers); err != nil {
		if !d.dirty {
			d.destroy()
		}
		ct.Fatalf(t, "Deploy: %s", err)
	}
	t.Logf("Deploy: %d homeserver(s) ready in %s (deployment %d, %s)", numServers, time.Since(t0).Round(time.Millisecond), d.id, d.Network())
	return d
}

// newDeployment must be called with m.mu held.
func (m *Manager) newDeployment(dirty bool) (*Deployment, error) {
	m.nextID++
	id := m.nextID
	third := (m.base[1] + id) % 256
	d := &Deployment{
		m:         m,
		id:        id,
		subnet:    fmt.Sprintf("127.%d.%d", m.base[0], third),
		dir:       filepath.Join(m.runDir, fmt.Sprintf("d%d", id)),
		dirty:     dirty,
		hs:        map[string]*Homeserver{},
		transport: newTransport(),
	}
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		return nil, err
	}
	d.hosts = filepath.Join(d.dir, "hosts")
	if err := d.writeHosts(); err != nil {
		return nil, err
	}
	m.live[d] = struct{}{}
	return d, nil
}

func (m *Manager) forget(d *Deployment) {
	m.mu.Lock()
	delete(m.live, d)
	m.mu.Unlock()
}

// Close stops every homeserver still running, the DNS stub, and removes the
// run's data (unless KeepData). Logs stay in the log directory.
func (m *Manager) Close() {
	m.mu.Lock()
	live := make([]*Deployment, 0, len(m.live))
	for d := range m.live {
		live = append(live, d)
	}
	m.mu.Unlock()
	for _, d := range live {
		d.destroy()
	}
	if m.dns != nil {
		q := m.dns.Queries()
		keys := make([]string, 0, len(q))
		for k := range q {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if m.dnsLog != nil {
			fmt.Fprintf(m.dnsLog, "== %s: %d distinct queries, all answered NXDOMAIN\n", m.runID, len(keys))
			for _, k := range keys {
				fmt.Fprintf(m.dnsLog, "   %5d %s\n", q[k], k)
			}
			m.dnsLog.Close()
		}
		m.dns.Close()
	}
	if !m.settings.KeepData {
		_ = os.RemoveAll(m.runDir)
	}
	m.logf("run %s closed after %s", m.runID, time.Since(m.started).Round(time.Second))
}
