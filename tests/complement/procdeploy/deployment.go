package procdeploy

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/matrix-org/complement/client"
	"github.com/matrix-org/complement/ct"
	"github.com/matrix-org/complement/helpers"
	"github.com/matrix-org/gomatrixserverlib"
)

// maxServers is how many homeservers a deployment can name (hs1..hs9): all of
// them are in its hosts file from the start, so a dirty deployment can grow.
const maxServers = 9

// Deployment is a set of homeserver processes: what Complement calls a
// deployment. It implements every method of complement.Deployment except
// GetConfig, whose return type is internal to Complement; the adapter that
// plugs this package into Complement adds it.
type Deployment struct {
	m      *Manager
	id     int
	subnet string // "127.A.B"
	dir    string
	hosts  string // hosts file bind-mounted as /etc/hosts for its homeservers
	dirty  bool

	mu        sync.Mutex
	hs        map[string]*Homeserver
	clients   []*client.CSAPI
	destroyed bool

	localpartCounter atomic.Int64
	transport        *http.Transport
}

func (d *Deployment) ipFor(hsName string) (string, error) {
	var n int
	if _, err := fmt.Sscanf(hsName, "hs%d", &n); err != nil || n < 1 || n > maxServers || fmt.Sprintf("hs%d", n) != hsName {
		return "", fmt.Errorf("homeserver name %q: this deployment names homeservers hs1..hs%d", hsName, maxServers)
	}
	return fmt.Sprintf("%s.%d", d.subnet, n+1), nil
}

func (d *Deployment) writeHosts() error {
	var b strings.Builder
	b.WriteString("# written by procdeploy for one Complement deployment; bind-mounted in the homeservers' mount namespaces only\n")
	b.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	fmt.Fprintf(&b, "127.0.0.1\t%s\n", d.m.settings.ComplementHostname)
	for n := 1; n <= maxServers; n++ {
		name := fmt.Sprintf("hs%d", n)
		ip, _ := d.ipFor(name)
		fmt.Fprintf(&b, "%s\t%s\n", ip, name)
	}
	return os.WriteFile(d.hosts, []byte(b.String()), 0o644)
}

// ensure starts homeservers hs1..hsN that are not running yet.
func (d *Deployment) ensure(n int) error {
	if n > maxServers {
		return fmt.Errorf("%d homeservers requested; at most %d are supported", n, maxServers)
	}
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("hs%d", i)
		d.mu.Lock()
		_, ok := d.hs[name]
		d.mu.Unlock()
		if ok {
			continue
		}
		ip, _ := d.ipFor(name)
		hs := &Homeserver{
			Name:        name,
			IP:          ip,
			Dir:         filepath.Join(d.dir, name),
			LogPath:     filepath.Join(d.m.logDir, fmt.Sprintf("%s-d%d-%s.log", d.m.settings.Namespace, d.id, name)),
			consolePath: filepath.Join(d.m.logDir, fmt.Sprintf("%s-d%d-%s.console.log", d.m.settings.Namespace, d.id, name)),
			seed:        fmt.Sprintf("%s/%d/%s", d.m.runID, d.id, name),
			m:           d.m,
		}
		hs.configPath = filepath.Join(hs.Dir, "homeserver.yaml")
		if err := hs.prepare(); err != nil {
			return fmt.Errorf("preparing %s: %w", name, err)
		}
		d.mu.Lock()
		d.hs[name] = hs
		d.mu.Unlock()
		t0 := time.Now()
		if err := hs.Start(d.hosts); err != nil {
			return err
		}
		d.m.logf("deployment %d: %s up at %s (pid %d) in %s", d.id, name, hs.IP, hs.PID(), time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

func (d *Deployment) server(t ct.TestLike, caller, hsName string) *Homeserver {
	t.Helper()
	d.mu.Lock()
	hs := d.hs[hsName]
	d.mu.Unlock()
	if hs == nil {
		ct.Fatalf(t, "%s: homeserver %q is not in this deployment", caller, hsName)
	}
	return hs
}

// Homeservers returns the deployment's homeservers by name.
func (d *Deployment) Homeservers() map[string]*Homeserver {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]*Homeserver, len(d.hs))
	for k, v := range d.hs {
		out[k] = v
	}
	return out
}

func (d *Deployment) newClient(t ct.TestLike, hsName string, hs *Homeserver) *client.CSAPI {
	c := &client.CSAPI{
		BaseURL:          hs.BaseURL(),
		Client:           client.NewLoggedClient(t, hsName, nil),
		SyncUntilTimeout: 5 * time.Second,
		Debug:            d.m.settings.Debug,
	}
	d.mu.Lock()
	d.clients = append(d.clients, c)
	d.mu.Unlock()
	return c
}

// UnauthenticatedClient returns a client without a user for hsName.
func (d *Deployment) UnauthenticatedClient(t ct.TestLike, hsName string) *client.CSAPI {
	t.Helper()
	return d.newClient(t, hsName, d.server(t, "UnauthenticatedClient", hsName))
}

// Register creates a new user (user-N[-suffix]) on hsName: admins through the
// shared-secret admin API, others through /register with m.login.dummy.
func (d *Deployment) Register(t ct.TestLike, hsName string, opts helpers.RegistrationOpts) *client.CSAPI {
	t.Helper()
	hs := d.server(t, "Register", hsName)
	c := d.newClient(t, hsName, hs)
	password := opts.Password
	if password == "" {
		password = "complement_meets_min_password_req"
	}
	c.Password = password
	localpart := fmt.Sprintf("user-%d", d.localpartCounter.Add(1))
	if opts.LocalpartSuffix != "" {
		localpart += "-" + opts.LocalpartSuffix
	}
	var userID, token, deviceID string
	if opts.IsAdmin {
		userID, token, deviceID = c.RegisterSharedSecret(t, localpart, password, true)
	} else {
		userID, token, deviceID = c.RegisterUser(t, localpart, password)
	}
	c.UserID, c.AccessToken, c.DeviceID = userID, token, deviceID
	return c
}

// Login logs in again as the user of `existing`, on hsName.
func (d *Deployment) Login(t ct.TestLike, hsName string, existing *client.CSAPI, opts helpers.LoginOpts) *client.CSAPI {
	t.Helper()
	hs := d.server(t, "Login", hsName)
	localpart, _, err := gomatrixserverlib.SplitID('@', existing.UserID)
	if err != nil {
		ct.Fatalf(t, "Login: existing client has an invalid user ID %q: %s", existing.UserID, err)
	}
	c := d.newClient(t, hsName, hs)
	c.Password = existing.Password
	if opts.Password != "" {
		c.Password = opts.Password
	}
	var userID, token, deviceID string
	if opts.DeviceID == "" {
		userID, token, deviceID = c.LoginUser(t, localpart, c.Password)
	} else {
		userID, token, deviceID = c.LoginUser(t, localpart, c.Password, client.WithDeviceID(opts.DeviceID))
	}
	c.UserID, c.AccessToken, c.DeviceID = userID, token, deviceID
	return c
}

// AppServiceUser is not supported: these processes have no application services.
func (d *Deployment) AppServiceUser(t ct.TestLike, hsName, appServiceUserID string) *client.CSAPI {
	t.Helper()
	ct.Fatalf(t, "AppServiceUser: application services are not supported by the process deployment")
	return nil
}

// Restart stops and starts every homeserver of the deployment. Addresses and
// ports do not change, so existing clients keep working.
func (d *Deployment) Restart(t ct.TestLike) error {
	t.Helper()
	for _, name := range d.names() {
		hs := d.server(t, "Restart", name)
		t0 := time.Now()
		if err := hs.Stop(d.m.settings.SpawnTimeout); err != nil {
			t.Errorf("Deployment.Restart: %s", err)
			return err
		}
		if err := hs.Start(d.hosts); err != nil {
			t.Errorf("Deployment.Restart: %s", err)
			return err
		}
		t.Logf("Restart: %s back up in %s", name, time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

// StopServer stops one homeserver (SIGTERM, then SIGKILL).
func (d *Deployment) StopServer(t ct.TestLike, hsName string) {
	t.Helper()
	t.Logf("StopServer %s", hsName)
	if err := d.server(t, "StopServer", hsName).Stop(d.m.settings.SpawnTimeout); err != nil {
		ct.Fatalf(t, "StopServer: %s", err)
	}
}

// StartServer starts a stopped homeserver again.
func (d *Deployment) StartServer(t ct.TestLike, hsName string) {
	t.Helper()
	t.Logf("StartServer %s", hsName)
	if err := d.server(t, "StartServer", hsName).Start(d.hosts); err != nil {
		ct.Fatalf(t, "StartServer: %s", err)
	}
}

// PauseServer freezes a homeserver (SIGSTOP); its sockets stay open.
func (d *Deployment) PauseServer(t ct.TestLike, hsName string) {
	t.Helper()
	t.Logf("PauseServer %s", hsName)
	if err := d.server(t, "PauseServer", hsName).Pause(); err != nil {
		ct.Fatalf(t, "PauseServer: %s", err)
	}
}

// UnpauseServer resumes a paused homeserver (SIGCONT).
func (d *Deployment) UnpauseServer(t ct.TestLike, hsName string) {
	t.Helper()
	t.Logf("UnpauseServer %s", hsName)
	if err := d.server(t, "UnpauseServer", hsName).Unpause(); err != nil {
		ct.Fatalf(t, "UnpauseServer: %s", err)
	}
}

// ContainerID has no container to name: it returns "pid:<pid>" of the process.
func (d *Deployment) ContainerID(t ct.TestLike, hsName string) string {
	t.Helper()
	return fmt.Sprintf("pid:%d", d.server(t, "ContainerID", hsName).PID())
}

// Network names the deployment's loopback /24.
func (d *Deployment) Network() string { return "loopback:" + d.subnet + ".0/24" }

// Destroy stops the deployment's homeservers (a dirty deployment is kept for
// the next test and stopped at the end of the package). When the test failed,
// the homeserver logs' paths (and tails, if configured) go into the test output.
func (d *Deployment) Destroy(t ct.TestLike) {
	t.Helper()
	if t.Failed() || d.m.settings.AlwaysPrintLogs {
		d.printLogs(t)
	}
	if d.dirty {
		return
	}
	d.destroy()
}

func (d *Deployment) printLogs(t ct.TestLike) {
	for _, name := range d.names() {
		hs := d.Homeservers()[name]
		t.Logf("%s log: %s (console: %s)", name, hs.LogPath, hs.consolePath)
		if n := d.m.settings.LogTail; n > 0 {
			t.Logf("last %d lines of %s's log:\n%s", n, name, tailFile(hs.LogPath, 0, n))
		}
	}
}

func (d *Deployment) destroy() {
	d.mu.Lock()
	if d.destroyed {
		d.mu.Unlock()
		return
	}
	d.destroyed = true
	servers := make([]*Homeserver, 0, len(d.hs))
	for _, hs := range d.hs {
		servers = append(servers, hs)
	}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, hs := range servers {
		wg.Add(1)
		go func(hs *Homeserver) {
			defer wg.Done()
			if err := hs.Stop(d.m.settings.SpawnTimeout); err != nil {
				d.m.logf("deployment %d: %s", d.id, err)
			}
		}(hs)
	}
	wg.Wait()
	if !d.m.settings.KeepData {
		for _, hs := range servers {
			hs.removeData()
		}
		_ = os.RemoveAll(d.dir)
	}
	d.transport.CloseIdleConnections()
	d.m.forget(d)
}

func (d *Deployment) names() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	names := make([]string, 0, len(d.hs))
	for n := range d.hs {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// RoundTripper maps federation requests for "hsN" to that homeserver's
// federation listener, and for Complement's hostname to loopback, as
// Complement's Docker round tripper does for containers.
func (d *Deployment) RoundTripper() http.RoundTripper { return &roundTripper{d: d} }

type roundTripper struct{ d *Deployment }

func (rt *roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Hostname()
	port := req.URL.Port()
	var target string
	if host == rt.d.m.settings.ComplementHostname {
		if port == "" {
			port = "8448"
		}
		target = net.JoinHostPort("127.0.0.1", port)
	} else {
		ip, err := rt.d.ipFor(host)
		if err != nil {
			return nil, fmt.Errorf("procdeploy round tripper: unknown host %q: %w", host, err)
		}
		if port == "" {
			port = fmt.Sprint(federationPort)
		}
		target = net.JoinHostPort(ip, port)
	}
	out := req.Clone(req.Context())
	out.URL.Scheme = "https"
	out.URL.Host = target
	out.Host = req.Host
	if out.Host == "" {
		out.Host = req.URL.Host
	}
	return rt.d.transport.RoundTrip(out)
}

func newTransport() *http.Transport {
	return &http.Transport{
		// Certificates are checked by the homeservers, not by Complement (as in
		// Complement's own round tripper); no keep-alive so a restarted server
		// never sees a stale connection.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
	}
}
