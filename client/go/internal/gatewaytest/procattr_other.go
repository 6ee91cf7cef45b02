//go:build !linux

package gatewaytest

import "os/exec"

func setProcAttr(cmd *exec.Cmd) {}
