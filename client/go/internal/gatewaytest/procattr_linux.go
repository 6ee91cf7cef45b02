package gatewaytest

import (
	"os/exec"
	"syscall"
)

// setProcAttr makes the subprocess die with the test binary, so a killed test run leaves no server behind.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
