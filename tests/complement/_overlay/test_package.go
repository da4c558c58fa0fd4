// This file is not compiled as part of this module (Go ignores directories
// whose names start with "_"). scripts/complement compiles it IN PLACE OF
// test_package.go of the pinned Complement module, through `go test -overlay`
// (see overlay.json.in and docs/complement.md): Complement's test files, its
// TestMain and every other file stay as the module proxy serves them.
//
// The pinned Complement (the only version the module proxy has) predates the
// custom-deployment hook (complement.WithDeployment, Complement PRs #750, #778,
// #780); with a version that has it, this file would be unnecessary and the
// deployment would be passed to complement.TestMain instead.
//
// It keeps the API that Complement's tests and test_main.go use (Deployment,
// TestPackage, NewTestPackage, Deploy, OldDeploy, Cleanup) and backs it with
// fastjoin/complement/procdeploy, which runs Synapse as local processes.

package complement

import (
	"fmt"
	"net/http"

	"github.com/matrix-org/complement/b"
	"github.com/matrix-org/complement/client"
	"github.com/matrix-org/complement/ct"
	"github.com/matrix-org/complement/helpers"
	"github.com/matrix-org/complement/internal/config"
	"github.com/sirupsen/logrus"

	"fastjoin/complement/procdeploy"
)

// Deployment is what a test gets from Deploy: the homeservers under test and
// ways to reach and control them. The method set is Complement's.
type Deployment interface {
	// UnauthenticatedClient returns a client with no user for the homeserver.
	UnauthenticatedClient(t ct.TestLike, serverName string) *client.CSAPI
	// Register creates a new user on the homeserver and returns its client.
	Register(t ct.TestLike, hsName string, opts helpers.RegistrationOpts) *client.CSAPI
	// Login logs in as the user of an existing client, on the homeserver.
	Login(t ct.TestLike, hsName string, existing *client.CSAPI, opts helpers.LoginOpts) *client.CSAPI
	// AppServiceUser returns a client for an application service user.
	AppServiceUser(t ct.TestLike, hsName, appServiceUserID string) *client.CSAPI
	// Restart restarts every homeserver of the deployment.
	Restart(t ct.TestLike) error
	// StopServer stops one homeserver.
	StopServer(t ct.TestLike, hsName string)
	// StartServer starts a stopped homeserver.
	StartServer(t ct.TestLike, hsName string)
	// PauseServer freezes a homeserver.
	PauseServer(t ct.TestLike, hsName string)
	// UnpauseServer resumes a frozen homeserver.
	UnpauseServer(t ct.TestLike, hsName string)
	// ContainerID identifies the homeserver to the runtime (here: its pid).
	ContainerID(t ct.TestLike, hsName string) string
	// Destroy ends the deployment.
	Destroy(t ct.TestLike)
	// GetConfig returns Complement's configuration for this run.
	GetConfig() *config.Complement
	// RoundTripper routes federation requests by homeserver name.
	RoundTripper() http.RoundTripper
	// Network names the network the homeservers are on.
	Network() string
}

// processDeployment adds GetConfig, whose type is internal to Complement, to
// the process deployment.
type processDeployment struct {
	*procdeploy.Deployment
	cfg *config.Complement
}

func (d *processDeployment) GetConfig() *config.Complement { return d.cfg }

// TestPackage holds the state of one test package (one test binary).
type TestPackage struct {
	Config  *config.Complement
	manager *procdeploy.Manager
}

// NewTestPackage reads Complement's configuration (which generates the run's
// CA) and our process settings, and prepares the process manager.
func NewTestPackage(pkgNamespace string) (*TestPackage, error) {
	// No Docker image is used; a placeholder keeps COMPLEMENT_BASE_IMAGE optional.
	cfg := config.NewConfigFromEnvVars(pkgNamespace, "synapse-fastjoin/local-processes")
	// gomatrixserverlib logs through logrus: keep only serious messages.
	logrus.SetLevel(logrus.ErrorLevel)

	settings, err := procdeploy.SettingsFromEnv()
	if err != nil {
		return nil, err
	}
	if settings.CACertPEM, err = cfg.CACertificateBytes(); err != nil {
		return nil, err
	}
	if settings.CAKeyPEM, err = cfg.CAPrivateKeyBytes(); err != nil {
		return nil, err
	}
	settings.Namespace = pkgNamespace
	settings.ComplementHostname = cfg.HostnameRunningComplement
	settings.SpawnTimeout = cfg.SpawnHSTimeout
	settings.Dirty = cfg.EnableDirtyRuns
	settings.Debug = cfg.DebugLoggingEnabled
	settings.AlwaysPrintLogs = cfg.AlwaysPrintServerLogs
	manager, err := procdeploy.NewManager(settings)
	if err != nil {
		return nil, err
	}
	return &TestPackage{Config: cfg, manager: manager}, nil
}

// Cleanup stops every homeserver of the package.
func (tp *TestPackage) Cleanup() { tp.manager.Close() }

// Deploy returns a deployment with homeservers hs1..hsN.
func (tp *TestPackage) Deploy(t ct.TestLike, numServers int) Deployment {
	t.Helper()
	return &processDeployment{Deployment: tp.manager.Deploy(t, numServers), cfg: tp.Config}
}

// OldDeploy supports only blueprints that declare homeservers and nothing on
// them (no users, rooms or application services).
func (tp *TestPackage) OldDeploy(t ct.TestLike, blueprint b.Blueprint) Deployment {
	t.Helper()
	for i, hs := range blueprint.Homeservers {
		if len(hs.Users) > 0 || len(hs.Rooms) > 0 || len(hs.ApplicationServices) > 0 {
			ct.Fatalf(t, "OldDeploy(%s): blueprints with users, rooms or application services are not supported by the process deployment", blueprint.Name)
		}
		if want := fmt.Sprintf("hs%d", i+1); hs.Name != want {
			ct.Fatalf(t, "OldDeploy(%s): homeserver %d is named %q; the process deployment supports hs1..hsN in order", blueprint.Name, i+1, hs.Name)
		}
	}
	return tp.Deploy(t, len(blueprint.Homeservers))
}
