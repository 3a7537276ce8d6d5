//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/driver"
)

// nodeInfo is the part of /v1/node/<id> the UI's client page draws from.
type nodeInfo struct {
	ID         string
	Status     string
	Attributes map[string]string
	Drivers    map[string]*struct {
		Detected          bool
		Healthy           bool
		HealthDescription string
		Attributes        map[string]string
		UpdateTime        time.Time
	}
}

// What the Nomad UI shows of a sandboxed task comes from the client's HTTP
// API, and every piece of it is there for a busy task: the driver's events,
// CPU and memory statistics, stdout and stderr (plain and followed), the
// file browser, exec, and the node's driver details.
func TestUISurfaces(t *testing.T) {
	defer catchPanic(t)
	j := runJob(t, shellJob(t, "service", "echo ready; echo busy-stderr >&2; while :; do :; done"))
	a := j.waitRunning(t)
	j.waitLogs(t, false, "ready")
	version := runscVersion(t)

	t.Run("task events", func(t *testing.T) {
		defer catchPanic(t)
		ts := j.waitEvents(t, "Limits applied")
		started := eventWith(ts, "Driver", "Sandbox started")
		must.NotNil(t, started, must.Sprintf("task: %s", ts))
		must.Eq(t, "Sandbox started: runsc "+version+", platform systrap", started.DisplayMessage)
		limits := eventWith(ts, "Driver", "Limits applied")
		must.RegexMatch(t, regexp.MustCompile(`^Limits applied: memory 128 MiB, cpu shares 100, .*pids \d+, disk \S+, \d+ inodes, timeout \S+$`), limits.DisplayMessage)
		// The events table shows DisplayMessage: every event has one, on
		// one line.
		for _, e := range ts.Events {
			must.NotEq(t, "", e.DisplayMessage, must.Sprintf("event %s has no display message", e.Type))
			must.StrNotContains(t, e.DisplayMessage, "\n")
			t.Logf("event %-16s %3d chars: %s", e.Type, len(e.DisplayMessage), e.DisplayMessage)
		}
	})

	t.Run("statistics", func(t *testing.T) {
		defer catchPanic(t)
		var st allocStats
		var last string
		must.Wait(t, wait.InitialSuccess(
			wait.ErrorFunc(func() error {
				st = allocStats{}
				if err := apiGet("/v1/client/allocation/"+url.PathEscape(j.allocID)+"/stats", &st); err != nil {
					return err
				}
				ru := st.ResourceUsage
				if ru == nil || ru.CpuStats == nil || ru.MemoryStats == nil {
					return errors.New("no resource usage yet")
				}
				last = fmt.Sprintf("cpu %+v; memory %+v", *ru.CpuStats, *ru.MemoryStats)
				if ru.CpuStats.TotalTicks <= 0 {
					return errors.New("TotalTicks is 0")
				}
				if ru.MemoryStats.Usage == 0 && ru.MemoryStats.RSS == 0 {
					return errors.New("memory Usage and RSS are 0")
				}
				return nil
			}),
			wait.Timeout(60*time.Second),
			wait.Gap(500*time.Millisecond),
		), must.Func(func() string { return "the allocation's stats never had CPU ticks and memory; last: " + last }))
		t.Logf("allocation stats: %s", last)
		must.MapContainsKey(t, st.Tasks, j.spec.Task)
	})

	t.Run("logs", func(t *testing.T) {
		defer catchPanic(t)
		base := "/v1/client/fs/logs/" + url.PathEscape(j.allocID) + "?task=" + url.QueryEscape(j.spec.Task)
		out := getText(t, base+"&type=stdout&plain=true&origin=start")
		must.Eq(t, "ready\n", out)
		must.Eq(t, "busy-stderr\n", getText(t, base+"&type=stderr&plain=true&origin=start"))
		// The UI follows the end of the log.
		must.StrContains(t, followText(t, base+"&type=stdout&plain=true&follow=true&origin=end&offset=50000", "ready\n"), "ready\n")
	})

	t.Run("files", func(t *testing.T) {
		defer catchPanic(t)
		var entries []struct {
			Name  string
			IsDir bool
		}
		must.NoError(t, apiGet("/v1/client/fs/ls/"+url.PathEscape(j.allocID)+"?path=/", &entries))
		names := map[string]bool{}
		for _, e := range entries {
			names[e.Name] = e.IsDir
		}
		must.True(t, names["alloc"], must.Sprintf("entries: %v", entries))
		must.True(t, names[j.spec.Task], must.Sprintf("entries: %v", entries))
	})

	t.Run("exec", func(t *testing.T) {
		defer catchPanic(t)
		// `nomad alloc exec` uses the same websocket endpoint as the UI's
		// terminal.
		j.waitExec(t, "from-the-ui")
	})

	t.Run("node driver", func(t *testing.T) {
		defer catchPanic(t)
		var alloc struct{ NodeID string }
		must.NoError(t, apiGet("/v1/allocation/"+url.PathEscape(a.ID), &alloc))
		var n nodeInfo
		must.NoError(t, apiGet("/v1/node/"+url.PathEscape(alloc.NodeID), &n))
		d := n.Drivers["sandbox"]
		must.NotNil(t, d, must.Sprintf("drivers: %v", n.Drivers))
		must.True(t, d.Detected)
		must.True(t, d.Healthy, must.Sprint(d.HealthDescription))
		must.NotEq(t, "", d.HealthDescription)
		must.Eq(t, version, d.Attributes["driver.sandbox.runsc.version"])
		must.Eq(t, "systrap", d.Attributes["driver.sandbox.platform"])
		must.Eq(t, driver.PluginVersion, d.Attributes["driver.sandbox.version"])
		must.Eq(t, "1", n.Attributes["driver.sandbox"], must.Sprint("the node does not list the driver among its attributes"))
		t.Logf("driver: healthy=%v %q attributes %v", d.Healthy, d.HealthDescription, d.Attributes)
	})
}

// getText reads a plain-text endpoint of the agent.
func getText(t *testing.T, path string) string {
	t.Helper()
	resp, err := httpClient.Get(suite.addr() + path)
	must.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	must.NoError(t, err)
	must.Eq(t, http.StatusOK, resp.StatusCode, must.Sprintf("GET %s: %s", path, b))
	return string(b)
}

// followText reads a streaming endpoint until what it sent holds want.
func followText(t *testing.T, path, want string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, suite.addr()+path, nil)
	must.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	must.NoError(t, err)
	defer resp.Body.Close()
	must.Eq(t, http.StatusOK, resp.StatusCode)
	var got strings.Builder
	r := bufio.NewReader(resp.Body)
	buf := make([]byte, 4096)
	for !strings.Contains(got.String(), want) {
		n, err := r.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			t.Fatalf("GET %s: %v after %q", path, err, got.String())
		}
	}
	return got.String()
}

// Every example jobspec, parsed as the Terraform provider parses it, is a
// job the agent accepts (`nomad job plan`), and the Terraform example's job
// runs: Nomad's runtime variables, escaped for Terraform, reach the task.
func TestExampleJobspecsRegister(t *testing.T) {
	defer catchPanic(t)
	c, err := api.NewClient(&api.Config{Address: suite.addr()})
	must.NoError(t, err)
	specs, err := loadExampleJobspecs(suite.repo, map[string]string{"rootfs": suite.rootfs})
	must.NoError(t, err)
	must.SliceNotEmpty(t, specs)

	// Node pools the examples steer to must exist for the job to be
	// accepted; the suite's node is in none of them.
	pools := map[string]bool{}
	jobs := map[string]*api.Job{}
	for _, s := range specs {
		job, err := s.parse()
		must.NoError(t, err, must.Sprintf("%s", s.Name))
		jobs[s.Name] = job
		if p := job.NodePool; p != nil && *p != "" && *p != "default" && *p != "all" {
			pools[*p] = true
		}
	}
	for p := range pools {
		_, err := c.NodePools().Register(&api.NodePool{Name: p, Description: "e2e: an example job's pool"}, nil)
		must.NoError(t, err)
		t.Cleanup(func() {
			if _, err := c.NodePools().Delete(p, nil); err != nil {
				t.Errorf("delete node pool %s: %v", p, err)
			}
		})
	}

	for _, s := range specs {
		job := jobs[s.Name]
		resp, _, err := c.Jobs().Plan(job, true, nil)
		must.NoError(t, err, must.Sprintf("the agent refuses %s", s.Name))
		t.Logf("%s: plan accepted (job %s%s)", s.Name, *job.ID, warnings(resp.Warnings))
	}

	// The Terraform example's nightly job, launched now.
	const name = "example-jobs/terraform/main.tf#nomad_job.nightly_audit"
	job := jobs[name]
	must.NotNil(t, job, must.Sprintf("%s not found", name))
	_, _, err = c.Jobs().Register(job, nil)
	must.NoError(t, err)
	t.Cleanup(func() { purgeWithChildren(t, *job.ID) })
	_, _, err = c.Jobs().PeriodicForce(*job.ID, nil)
	must.NoError(t, err)

	var child, allocID string
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			kids, _, err := c.Jobs().PrefixList(*job.ID + "/periodic-")
			if err != nil {
				return err
			}
			if len(kids) != 1 {
				return fmt.Errorf("%d launches, want 1", len(kids))
			}
			child = kids[0].ID
			allocs, _, err := c.Jobs().Allocations(child, true, nil)
			if err != nil {
				return err
			}
			if len(allocs) != 1 {
				return fmt.Errorf("%d allocations, want 1", len(allocs))
			}
			allocID = allocs[0].ID
			if err := suite.recordAlloc(allocID); err != nil {
				return err
			}
			switch allocs[0].ClientStatus {
			case "complete", "failed", "lost":
				return nil
			}
			return fmt.Errorf("allocation %s is %s", allocID, allocs[0].ClientStatus)
		}),
		wait.Timeout(90*time.Second),
		wait.Gap(250*time.Millisecond),
	), must.Sprintf("the forced launch of %s did not complete", *job.ID))

	a, err := getAlloc(allocID)
	must.NoError(t, err)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", a.TaskStates["audit"]))
	out := getText(t, "/v1/client/fs/logs/"+url.PathEscape(allocID)+"?task=audit&type=stdout&plain=true&origin=start")
	must.Eq(t, fmt.Sprintf("nightly audit: job %s, allocation %s\n", child, allocID), out)
}

func warnings(w string) string {
	if w == "" {
		return ""
	}
	return "; warnings: " + strings.TrimSpace(w)
}
