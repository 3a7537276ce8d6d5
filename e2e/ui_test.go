//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
	"github.com/shoenig/test/must"
)

// screenshotsEnv names the directory the UI test saves its full-page
// screenshots in; unset, they go to the test's temporary directory (and are
// removed with it).
const screenshotsEnv = "SANDBOX_UI_SCREENSHOTS"

// uiTimeout bounds every wait on the rendered page. The UI polls the agent
// every few seconds and the machine may be busy: generous, but finite.
const uiTimeout = 90 * time.Second

// An operator watching sandboxed tasks in Nomad's web UI (served by the
// suite's agent at /ui/) sees, in a real browser, for a busy service task
// and a batch task stopped by its time limit: the job and allocation pages
// without console errors, the task's state and events (the driver's own
// among them), non-zero CPU and memory use, stdout and stderr in the log
// viewer, and a shell from the exec window. Everything is read from the
// rendered page, never from the API.
func TestUI(t *testing.T) {
	defer catchPanic(t)
	b := newBrowser(t)
	version := runscVersion(t)

	// The service task writes to both streams, asks its DNS service for a
	// name its egress does not list (refused there, nothing leaves the
	// node) and keeps a core busy.
	svcSpec := shellJob(t, "service",
		"echo ui-stdout-ready; echo ui-stderr-ready >&2; nslookup not-allowed.example.invalid >/dev/null 2>&1; while :; do :; done")
	svcSpec.ExtraConfig = []string{`egress = ["deb.debian.org:443"]`}
	// The batch task outlives its time limit.
	batchSpec := shellJob(t, "batch", "echo ui-batch-stdout; echo ui-batch-stderr >&2; sleep 60")
	batchSpec.ExtraConfig = []string{`timeout = "3s"`}
	svc := runJob(t, svcSpec)
	batch := runJob(t, batchSpec)

	t.Run("service task", func(t *testing.T) {
		defer catchPanic(t)
		j := svc
		b.jobPage(t, j, "running", "service-job")
		b.page(t, "allocation page", "/ui/allocations/"+j.allocID, "service-allocation", func(t *testing.T) {
			b.waitTaskRow(t, j, "running")
			// The allocation's own charts.
			b.waitUsage(t)
		})
		b.page(t, "task page", taskPath(j), "service-task", func(t *testing.T) {
			b.waitText(t, "h1.title .tag", "running")
			b.waitEvent(t, "Driver", "Sandbox started: runsc "+version+", platform systrap")
			b.waitEventMatch(t, "Driver", regexp.MustCompile(`Limits applied: memory 128 MiB, cpu shares 100, .*pids \d+, .*timeout \S+`))
			b.waitEventMatch(t, "Driver", regexp.MustCompile(`Egress denied: DNS not-allowed\.example\.invalid \(\d+\)`))
			b.waitUsage(t)
		})
		b.page(t, "logs", taskPath(j)+"/logs", "service-logs-stderr", func(t *testing.T) {
			b.checkLogs(t, "service-logs-stdout", "ui-stdout-ready", "ui-stderr-ready")
		})
		// The window the task page's Exec button opens.
		execPath := fmt.Sprintf("/ui/exec/%s/g/%s?allocation=%s&namespace=default", j.spec.Name, j.spec.Task, j.allocID[:8])
		b.page(t, "exec", execPath, "service-exec", func(t *testing.T) {
			b.checkExec(t, j)
		})
	})

	t.Run("batch task", func(t *testing.T) {
		defer catchPanic(t)
		j := batch
		// The task page first: it waits for the task's end.
		b.page(t, "task page", taskPath(j), "batch-task", func(t *testing.T) {
			b.waitText(t, "h1.title .tag", "dead")
			b.waitEvent(t, "Driver", "Sandbox started: runsc "+version+", platform systrap")
			b.waitEventMatch(t, "Driver", regexp.MustCompile(`Limits applied: memory 128 MiB, .*timeout 3s`))
			b.waitEventMatch(t, "Driver", regexp.MustCompile(`Time limit exceeded: ran \S+, timeout is 3s`))
			b.waitEventMatch(t, "Terminated", regexp.MustCompile(`time limit of 3s exceeded`))
		})
		b.jobPage(t, j, "failed", "batch-job")
		b.page(t, "allocation page", "/ui/allocations/"+j.allocID, "batch-allocation", func(t *testing.T) {
			b.waitText(t, "h1.title .tag", "failed")
			b.waitTaskRow(t, j, "dead")
		})
		b.page(t, "logs", taskPath(j)+"/logs", "batch-logs-stderr", func(t *testing.T) {
			b.checkLogs(t, "batch-logs-stdout", "ui-batch-stdout", "ui-batch-stderr")
		})
	})
}

func taskPath(j *runningJob) string { return "/ui/allocations/" + j.allocID + "/" + j.spec.Task }

// page runs checks in a subtest on the page at path, then saves a
// screenshot named shot and fails the subtest if the browser's console had
// errors on the page.
func (b *browser) page(t *testing.T, name, path, shot string, checks func(t *testing.T)) {
	t.Helper()
	t.Run(name, func(t *testing.T) {
		defer catchPanic(t)
		b.open(t, path)
		checks(t)
		b.screenshot(t, shot)
		b.noConsoleErrors(t)
	})
}

// jobPage checks the job's page: its name, and its allocation with status
// among the recent allocations.
func (b *browser) jobPage(t *testing.T, j *runningJob, status, shot string) {
	t.Helper()
	b.page(t, "job page", "/ui/jobs/"+j.spec.Name+"@default", shot, func(t *testing.T) {
		b.waitText(t, "h1.title", j.spec.Name)
		b.waitAllocRow(t, j, status)
	})
}

// browser is one headless chromium with one tab, and what its console said.
type browser struct {
	ctx   context.Context // the tab
	base  string          // the agent's address
	shots string          // where screenshots go

	mu       sync.Mutex
	consoleN int      // errors before the current page was opened
	seen     int      // errors looked at for aborted loads
	console  []string // console errors, uncaught exceptions, failed loads
}

// newBrowser starts Debian's chromium headless; the test's cleanup kills it
// (and chromedp waits for it to exit).
func newBrowser(t *testing.T) *browser {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium is not installed (make deps installs Debian's chromium package): %v", err)
	}
	shots := os.Getenv(screenshotsEnv)
	if shots == "" {
		shots = t.TempDir()
	}
	must.NoError(t, os.MkdirAll(shots, 0o755))
	profile := t.TempDir()

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1280, 1000),
		// The suite runs as root, and chromium refuses to start its
		// own (setuid/namespace) sandbox as root. It only ever loads
		// the suite's agent on loopback.
		chromedp.NoSandbox,
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-dev-shm-usage", true),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // kills chromium and waits for it
	})

	b := &browser{ctx: ctx, base: suite.addr(), shots: shots}
	// Starts the browser.
	must.NoError(t, chromedp.Do(ctx, chromedp.Navigate("about:blank")), must.Sprint("start chromium"))
	// Console errors, uncaught exceptions and the browser log's errors
	// (failed loads among them), collected until the tab closes.
	messages := chromedp.Console(ctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.Type != chromedp.ConsoleError && m.Type != chromedp.ConsoleException {
				continue
			}
			b.mu.Lock()
			b.console = append(b.console, strings.TrimSpace(fmt.Sprintf("%s %s %s", m, m.Source, m.URL)))
			b.mu.Unlock()
		}
	}()
	return b
}

// run runs actions on the tab, failing the test if they do not finish
// within uiTimeout.
func (b *browser) run(t *testing.T, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, uiTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// open loads path of the agent's UI in the tab.
func (b *browser) open(t *testing.T, path string) {
	t.Helper()
	b.mu.Lock()
	b.consoleN = len(b.console)
	b.seen = b.consoleN
	b.mu.Unlock()
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(b.ctx, uiTimeout)
		err := chromedp.Do(ctx, chromedp.Navigate(b.base+path), chromedp.WaitReady(chromedp.CSS("body")))
		cancel()
		if err == nil {
			return
		}
		if attempt == 3 || !networkChanged.MatchString(err.Error()) {
			t.Fatalf("open %s: %v", path, err)
		}
		t.Logf("open %s again: %v", path, err)
	}
}

// networkChanged is how chromium reports a load it aborted because the
// host's network interfaces changed. The suite's other tests add and remove
// veths and namespaces all the time (seen: the UI's own scripts cut off, a
// page that never rendered), which says nothing about Nomad or the driver.
var networkChanged = regexp.MustCompile(`net::ERR_NETWORK_CHANGED`)

// reloadIfNetworkChanged reloads the page when chromium aborted one of its
// loads, since the last look, because the host's interfaces changed.
func (b *browser) reloadIfNetworkChanged(t *testing.T, ctx context.Context) {
	b.mu.Lock()
	var hit string
	for _, e := range b.console[b.seen:] {
		if networkChanged.MatchString(e) {
			hit = e
		}
	}
	b.seen = len(b.console)
	b.mu.Unlock()
	if hit == "" {
		return
	}
	t.Logf("reloading the page: chromium aborted a load when the host's interfaces changed (%s)", hit)
	if err := chromedp.Do(ctx, chromedp.Reload()); err != nil {
		t.Logf("reload: %v", err)
	}
}

// nomadUINoise is the one console error the Nomad 1.6 UI logs on every page
// of an agent without ACLs: it asks for its own token, and the agent answers
// 400 "ACL support disabled". Nothing of the driver's is involved.
var nomadUINoise = regexp.MustCompile(`^error: Failed to load resource: the server responded with a status of 400 \(Bad Request\) network http://127\.0\.0\.1:\d+/v1/acl/token/self$`)

// noConsoleErrors fails the test if the browser logged an error since the
// current page was opened.
func (b *browser) noConsoleErrors(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	var errs []string
	for _, e := range b.console[b.consoleN:] {
		if nomadUINoise.MatchString(e) {
			t.Logf("KNOWN NOMAD UI BEHAVIOUR (not failing the test): %s", e)
			continue
		}
		if networkChanged.MatchString(e) {
			t.Logf("load aborted by a change of the host's interfaces, page reloaded (not failing the test): %s", e)
			continue
		}
		errs = append(errs, e)
	}
	b.mu.Unlock()
	if len(errs) > 0 {
		t.Errorf("the browser console has errors on this page:\n%s", strings.Join(errs, "\n"))
	}
}

// texts returns the rendered text (innerText) of every element matching
// the CSS selector sel.
func (b *browser) texts(ctx context.Context, sel string) ([]string, error) {
	js := fmt.Sprintf(`Array.from(document.querySelectorAll(%s)).map(e => e.innerText)`, jsString(sel))
	return chromedp.Run(ctx, chromedp.Evaluate[[]string](js))
}

// poll evaluates cond on the rendered page until it returns nil. After
// uiTimeout it marks the test failed with cond's last error and a screenshot,
// and returns: the checks that follow on the same page still run.
func (b *browser) poll(t *testing.T, what string, cond func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, uiTimeout)
	defer cancel()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		b.reloadIfNetworkChanged(t, ctx)
		err := cond(ctx)
		if err == nil {
			return
		}
		// The deadline cuts the last evaluation short: keep what the
		// page showed before.
		if last == nil || ctx.Err() == nil {
			last = err
		}
		select {
		case <-ctx.Done():
			url, _ := chromedp.Run(b.ctx, chromedp.Location())
			b.screenshot(t, "failed-"+strings.NewReplacer("/", "-", " ", "-").Replace(t.Name()))
			t.Errorf("page %s: %s: not within %s: %v", url, what, uiTimeout, last)
			return
		case <-tick.C:
		}
	}
}

// waitText waits until an element matching sel shows want (in any case:
// the UI's styles upper-case some labels).
func (b *browser) waitText(t *testing.T, sel, want string) {
	t.Helper()
	b.poll(t, fmt.Sprintf("%q shows %q", sel, want), func(ctx context.Context) error {
		got, err := b.texts(ctx, sel)
		if err != nil {
			return err
		}
		for _, s := range got {
			if strings.Contains(strings.ToLower(s), strings.ToLower(want)) {
				return nil
			}
		}
		return fmt.Errorf("it shows %q", got)
	})
}

// waitEvent waits until the task page's events table has a row of type typ
// whose description holds want.
func (b *browser) waitEvent(t *testing.T, typ, want string) {
	t.Helper()
	b.waitEventMatch(t, typ, regexp.MustCompile(regexp.QuoteMeta(want)))
}

func (b *browser) waitEventMatch(t *testing.T, typ string, re *regexp.Regexp) {
	t.Helper()
	// Columns: time, type, description.
	b.waitRow(t, "Recent Events", fmt.Sprintf("an event %q matching %q", typ, re), func(r []string) bool {
		return len(r) == 3 && r[1] == typ && re.MatchString(r[2])
	})
}

// waitAllocRow waits until the job page's recent allocations list the job's
// allocation with status.
func (b *browser) waitAllocRow(t *testing.T, j *runningJob, status string) {
	t.Helper()
	// Columns: icons, short ID, group, created, modified, status, ...
	b.waitRow(t, "Recent Allocations", fmt.Sprintf("allocation %s %s", j.allocID[:8], status), func(r []string) bool {
		return len(r) > 5 && r[1] == j.allocID[:8] && strings.EqualFold(r[5], status)
	})
}

// waitTaskRow waits until the allocation page lists the job's task in state.
func (b *browser) waitTaskRow(t *testing.T, j *runningJob, state string) {
	t.Helper()
	// Columns: icon, name, state, last event, time, ...
	b.waitRow(t, "Tasks", fmt.Sprintf("task %s %s", j.spec.Task, state), func(r []string) bool {
		return len(r) > 2 && r[1] == j.spec.Task && strings.EqualFold(r[2], state)
	})
}

// sectionRows is a JavaScript function: the text of each cell of each row
// of the table in the page section (a box) whose heading starts with title.
// The UI's production build strips its data-test attributes, so pages are
// read by their structure and headings, as a person reads them.
const sectionRows = `((title) => {
	const head = Array.from(document.querySelectorAll(".boxed-section-head")).find(h => h.innerText.trim().startsWith(title));
	if (!head) return [];
	return Array.from(head.closest(".boxed-section").querySelectorAll("tbody tr")).map(r =>
		Array.from(r.querySelectorAll("td")).map(c => c.innerText.trim()));
})`

// waitRow waits until a row of the table under the heading section is one
// that match accepts.
func (b *browser) waitRow(t *testing.T, section, what string, match func(cells []string) bool) {
	t.Helper()
	b.poll(t, fmt.Sprintf("%q lists %s", section, what), func(ctx context.Context) error {
		rows, err := chromedp.Run(ctx, chromedp.Evaluate[[][]string](sectionRows+"("+jsString(section)+")"))
		if err != nil {
			return err
		}
		for _, r := range rows {
			if match(r) {
				return nil
			}
		}
		return fmt.Errorf("it holds %q", rows)
	})
}

// usedValue finds "<number> <unit>" in the bold (used) part of a chart's
// "used / reserved Total" line; the number may have thousands separators.
var usedValue = regexp.MustCompile(`^([0-9.,]+)\s*(\S*)$`)

// waitUsage waits until the page's CPU and memory charts show use above
// zero.
func (b *browser) waitUsage(t *testing.T) {
	t.Helper()
	b.waitNonZero(t, "CPU", "MHz")
	b.waitNonZero(t, "Memory", "iB")
}

// waitNonZero waits until the utilization chart titled title shows a used
// amount above zero in a unit ending in unit.
func (b *browser) waitNonZero(t *testing.T, title, unit string) {
	t.Helper()
	b.poll(t, fmt.Sprintf("the %s chart shows use above zero", title), func(ctx context.Context) error {
		js := `Array.from(document.querySelectorAll(".primary-metric")).map(c => [
			(c.querySelector("h4") || {innerText: ""}).innerText.trim(),
			(c.querySelector(".annotation strong") || {innerText: ""}).innerText.trim(),
			(c.querySelector(".annotation") || {innerText: ""}).innerText.trim()])`
		charts, err := chromedp.Run(ctx, chromedp.Evaluate[[][]string](js))
		if err != nil {
			return err
		}
		for _, c := range charts {
			if len(c) != 3 || c[0] != title {
				continue
			}
			m := usedValue.FindStringSubmatch(c[1])
			if m == nil || !strings.HasSuffix(m[2], unit) {
				return fmt.Errorf("the %s chart says %q", title, c[2])
			}
			if v, err := strconv.ParseFloat(strings.ReplaceAll(m[1], ",", ""), 64); err != nil || v <= 0 {
				return fmt.Errorf("the %s chart says %q", title, c[2])
			}
			t.Logf("%s chart: %s", title, c[2])
			return nil
		}
		return fmt.Errorf("no %s chart among %q", title, charts)
	})
}

// logBox is the log viewer's text.
const logBox = ".boxed-section-body.is-dark code"

// checkLogs waits for the log viewer to show the task's stdout, then
// (after a click on its button) stderr; shot is the screenshot of stdout.
func (b *browser) checkLogs(t *testing.T, shot, stdout, stderr string) {
	t.Helper()
	// The head's buttons: stdout, stderr. The viewer opens on the stream
	// shown last, so both are clicked.
	b.run(t, "show stdout", chromedp.Click(chromedp.CSS(".task-log-head > span:first-child > button:nth-of-type(1)")))
	b.waitText(t, logBox, stdout)
	b.screenshot(t, shot)
	b.run(t, "show stderr", chromedp.Click(chromedp.CSS(".task-log-head > span:first-child > button:nth-of-type(2)")))
	b.waitText(t, logBox, stderr)
	got, err := b.texts(b.ctx, logBox)
	must.NoError(t, err)
	must.StrNotContains(t, strings.Join(got, "\n"), stdout, must.Sprint("the stderr view shows stdout"))
}

// checkExec starts a shell from the exec window of the job's task and runs
// a command in that shell. The window runs the command line it is
// given as one program without arguments (Nomad 1.6 sends it as a
// one-element argv), so an operator starts a shell and types into it.
func (b *browser) checkExec(t *testing.T, j *runningJob) {
	t.Helper()
	// Once it has found the task, the window suggests a command
	// ("/bin/bash" unless another was run before).
	b.waitTerminal(t, "Customize your command", "")
	b.run(t, "focus the terminal", chromedp.Focus(chromedp.CSS(".xterm-helper-textarea")))
	suggested, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](`localStorage.getItem("nomadExecCommand") || '"/bin/bash"'`))
	must.NoError(t, err)
	var cmd string
	must.NoError(t, json.Unmarshal([]byte(suggested), &cmd), must.Sprintf("stored command %q", suggested))
	// xterm.js sends DEL for Backspace, which clears one character of the
	// suggestion; the text is typed as a committed text input, which
	// xterm.js takes once (a synthesized key press would be taken twice).
	b.run(t, "start a shell",
		chromedp.KeyEvent(strings.Repeat(kb.Backspace, len(cmd))),
		insertText("/bin/sh"), chromedp.KeyEvent(kb.Enter))
	b.waitTerminal(t, "#", "/bin/sh")
	// The arithmetic is done by the task's shell, so the answer is not the
	// terminal echoing what was typed.
	b.run(t, "run a command in the shell", insertText("echo from-the-ui-$((6*7)) $(hostname)"), chromedp.KeyEvent(kb.Enter))
	b.waitTerminal(t, "from-the-ui-42 "+j.spec.Task, "/bin/sh")
}

// insertText types text into the focused element as one text input.
func insertText(text string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := cdp.Call(ctx, t, input.InsertText, input.InsertTextParams{Text: text})
		return err
	})
}

// waitTerminal waits until the exec window's terminal shows want after the
// first occurrence of after (anywhere if after is empty). xterm.js
// draws on a canvas, so its screen is read from the terminal object the UI
// keeps in window.execTerminal (as Nomad's own UI tests do).
func (b *browser) waitTerminal(t *testing.T, want, after string) {
	t.Helper()
	b.poll(t, fmt.Sprintf("the terminal shows %q after %q", want, after), func(ctx context.Context) error {
		js := `(() => {
			const term = window.execTerminal;
			if (!term) return "";
			const buf = term.buffer.active;
			const lines = [];
			for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i).translateToString(true));
			return lines.join("\n");
		})()`
		screen, err := chromedp.Run(ctx, chromedp.Evaluate[string](js))
		if err != nil {
			return err
		}
		_, rest, ok := strings.Cut(screen, after)
		if !ok || !strings.Contains(rest, want) {
			return fmt.Errorf("it shows:\n%s", strings.TrimSpace(screen))
		}
		return nil
	})
}

// screenshot saves the whole page as <name>.png in the screenshot
// directory.
func (b *browser) screenshot(t *testing.T, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, uiTimeout)
	defer cancel()
	// Quality 100 gives PNG.
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Errorf("screenshot %s: %v", name, err)
		return
	}
	path := filepath.Join(b.shots, name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Errorf("screenshot %s: %v", name, err)
		return
	}
	t.Logf("screenshot: %s", path)
}

// jsString quotes s as a JavaScript string literal.
func jsString(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}
