package gatewaytest

import (
	"os/exec"
	"syscall"
)

// setProcAttr sends the harness SIGTERM when the test binary dies, so a killed test run leaves no gateway behind:
// the harness stops its gateway and upstream on SIGTERM.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
