package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// bindMount is one volume as the pod sees it.
type bindMount struct {
	source, target string
	readOnly       bool
}

// sandbox is a pod's private file system: a mount namespace kept alive by a sleeping process, which
// every container process and exec joins with nsenter. This plays the role of a pod's pause container.
type sandbox struct {
	dir      string
	hostname string
	pid      int
	process  *exec.Cmd
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// startSandbox mounts the pod's root and volumes inside a new mount namespace and returns once they are
// in place. The overlay's upper layer is per pod, so files a pod writes outside its volumes are its own.
func startSandbox(dir, image, hostname string, mounts []bindMount) (*sandbox, error) {
	root := filepath.Join(dir, "root")
	upper, work := filepath.Join(dir, "upper"), filepath.Join(dir, "work")
	for _, d := range []string{root, upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	lower := "/"
	if image != "" {
		// overlayfs refuses a lower layer that sits inside another lower layer (ELOOP), and every
		// directory is inside "/": the image is copied to a tmpfs of its own first. Images are small.
		layer := filepath.Join(dir, "image")
		if err := os.MkdirAll(layer, 0o755); err != nil {
			return nil, err
		}
		fmt.Fprintf(&script, "mount -t tmpfs tmpfs %[1]s\ncp -a %[2]s/. %[1]s/\n", shellQuote(layer), shellQuote(image))
		lower = layer + ":/"
	}
	fmt.Fprintf(&script, "mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s\n",
		lower, upper, work, shellQuote(root))
	for _, m := range mounts {
		target := shellQuote(filepath.Join(root, m.target))
		fmt.Fprintf(&script, "mkdir -p %s\nmount --bind %s %s\n", target, shellQuote(m.source), target)
		if m.readOnly {
			fmt.Fprintf(&script, "mount -o remount,bind,ro %s\n", target)
		}
	}
	fmt.Fprintf(&script, "mount -t tmpfs -o mode=1777 tmpfs %[1]s/tmp\nmount -t tmpfs tmpfs %[1]s/run\n"+
		"mount --rbind /dev %[1]s/dev\nmount -t proc proc %[1]s/proc\nmount --rbind /sys %[1]s/sys\n"+
		"hostname %[2]s\nexec chroot %[1]s /bin/sh -c 'echo sandbox-ready; exec sleep infinity'\n",
		shellQuote(root), shellQuote(hostname))

	// With its own PID namespace a pod sees only its own processes, as in a container: `pgrep ipa-backup`
	// in one pod must not find another pod's. unshare forks the namespace's first process for that.
	cmd := exec.Command("unshare", "--mount", "--uts", "--pid", "--fork", "--propagation", "private",
		"sh", "-c", script.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "sandbox.log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	// Ready is announced from inside the chroot: an exec that joins earlier would see the host's root.
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "sandbox-ready" {
		_ = cmd.Wait()
		detail, _ := os.ReadFile(filepath.Join(dir, "sandbox.log"))
		return nil, fmt.Errorf("sandbox setup failed: %s", strings.TrimSpace(string(detail)))
	}
	pid, err := onlyChild(cmd.Process.Pid)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	_ = os.WriteFile(filepath.Join(dir, "sandbox.pid"), []byte(strconv.Itoa(pid)), 0o644)
	return &sandbox{dir: dir, hostname: hostname, pid: pid, process: cmd}, nil
}

// onlyChild finds the process unshare forked into the new namespaces: the one every exec joins.
func onlyChild(pid int) (int, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0, err
	}
	fields := strings.Fields(string(raw))
	if len(fields) != 1 {
		return 0, fmt.Errorf("unshare has %d children, expected one", len(fields))
	}
	return strconv.Atoi(fields[0])
}

// command prepares a process that runs inside the sandbox as root in its root directory, with exactly
// the given environment (a container's), as a container runtime would start it.
func (s *sandbox) command(env []string, argv []string) *exec.Cmd {
	args := append([]string{"--target", strconv.Itoa(s.pid), "--mount", "--uts", "--pid", "--root", "--wd", "--"}, argv...)
	cmd := exec.Command("nsenter", args...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// stop ends every process in the sandbox's mount namespace, the execs included, and removes its files:
// a deleted pod leaves nothing running behind.
func (s *sandbox) stop(grace time.Duration) {
	killNamespace(s.pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) && len(namespaceMembers(s.pid)) > 1 {
		time.Sleep(100 * time.Millisecond)
	}
	killNamespace(s.pid, syscall.SIGKILL)
	if s.process != nil {
		_ = s.process.Wait()
	}
	if err := os.RemoveAll(s.dir); err != nil {
		klog.Warningf("removing sandbox %s: %v", s.dir, err)
	}
}

func killNamespace(pid int, sig syscall.Signal) {
	for _, member := range namespaceMembers(pid) {
		_ = syscall.Kill(member, sig)
	}
}

// namespaceMembers lists the processes sharing pid's mount namespace, pid included.
func namespaceMembers(pid int) []int {
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		return nil
	}
	self, _ := os.Readlink("/proc/self/ns/mnt")
	if ns == self {
		return nil // never signal the host's own namespace
	}
	entries, _ := os.ReadDir("/proc")
	var members []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if other, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", p)); err == nil && other == ns {
			members = append(members, p)
		}
	}
	return members
}

// reapStaleSandboxes ends sandboxes left by an earlier run of this process, whose pods are re-created
// from scratch, the way a node reboot restarts every container.
func reapStaleSandboxes(podsDir string) {
	entries, _ := os.ReadDir(podsDir)
	for _, e := range entries {
		dir := filepath.Join(podsDir, e.Name())
		if raw, err := os.ReadFile(filepath.Join(dir, "sandbox.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(raw))); err == nil {
				killNamespace(pid, syscall.SIGKILL)
			}
		}
		_ = exec.Command("umount", "-R", "-l", filepath.Join(dir, "root")).Run()
		_ = os.RemoveAll(dir)
	}
}
