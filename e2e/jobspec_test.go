// This file has no build tag: its test runs in a plain `go test ./...`,
// without an agent. The e2e suite (-tags e2e) uses its loader to register
// the same jobspecs with a real agent (TestExampleJobspecsRegister).

package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/hashicorp/nomad/api"
	"github.com/hashicorp/nomad/helper/pluginutils/hclspecutils"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/jobspec2"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/zclconf/go-cty/cty"
	"github.com/zclconf/go-cty/cty/function"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/driver"
)

// exampleJobspec is one jobspec of example-jobs/: a job file, or the
// jobspec of a nomad_job resource of a Terraform example, as the Terraform
// provider hands it to Nomad's parser.
type exampleJobspec struct {
	Name    string // "example-jobs/x.nomad.hcl" or "example-jobs/terraform/main.tf#nomad_job.NAME"
	Body    []byte
	AllowFS bool     // the resource's hcl2 { allow_fs }
	ArgVars []string // the resource's hcl2 { vars }, as KEY=VALUE
}

// parse parses the jobspec the way the Terraform provider (and `nomad job
// run`) does: HCL2, strict.
func (s exampleJobspec) parse() (*api.Job, error) {
	return jobspec2.ParseWithConfig(&jobspec2.ParseConfig{
		Path:    "",
		Body:    s.Body,
		AllowFS: s.AllowFS,
		ArgVars: s.ArgVars,
		Strict:  true,
	})
}

// loadExampleJobspecs finds every *.nomad.hcl file and every nomad_job
// resource of the *.tf files under repo/example-jobs. tfVars override the
// Terraform variables' defaults, like `terraform apply -var`.
func loadExampleJobspecs(repo string, tfVars map[string]string) ([]exampleJobspec, error) {
	root := filepath.Join(repo, "example-jobs")
	var out []exampleJobspec
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(repo, p)
		switch {
		case strings.HasSuffix(p, ".nomad.hcl"):
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out = append(out, exampleJobspec{Name: rel, Body: b})
		case strings.HasSuffix(p, ".tf"):
			specs, err := terraformJobspecs(p, rel, tfVars)
			if err != nil {
				return err
			}
			out = append(out, specs...)
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// terraformJobspecs evaluates the jobspec of each nomad_job resource in a
// Terraform file as Terraform would: the heredoc is an HCL template, so
// "$${" becomes "${" and "${var.x}" is the variable's value. It knows
// var.*, path.module and file(); anything else fails the evaluation.
func terraformJobspecs(path, rel string, tfVars map[string]string) ([]exampleJobspec, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, diags := hclsyntax.ParseConfig(src, rel, hcl.InitialPos)
	if diags.HasErrors() {
		return nil, diags
	}
	body := f.Body.(*hclsyntax.Body)
	dir := filepath.Dir(path)

	vars := map[string]cty.Value{}
	for _, b := range body.Blocks {
		if b.Type != "variable" || len(b.Labels) != 1 {
			continue
		}
		name := b.Labels[0]
		if v, ok := tfVars[name]; ok {
			vars[name] = cty.StringVal(v)
			continue
		}
		if a, ok := b.Body.Attributes["default"]; ok {
			v, diags := a.Expr.Value(nil)
			if diags.HasErrors() {
				return nil, diags
			}
			vars[name] = v
		}
	}
	ctx := &hcl.EvalContext{
		Variables: map[string]cty.Value{
			"var":  cty.ObjectVal(vars),
			"path": cty.ObjectVal(map[string]cty.Value{"module": cty.StringVal(dir)}),
		},
		Functions: map[string]function.Function{"file": terraformFileFunc(dir)},
	}

	var out []exampleJobspec
	for _, b := range body.Blocks {
		if b.Type != "resource" || len(b.Labels) != 2 || b.Labels[0] != "nomad_job" {
			continue
		}
		name := fmt.Sprintf("%s#nomad_job.%s", rel, b.Labels[1])
		a, ok := b.Body.Attributes["jobspec"]
		if !ok {
			return nil, fmt.Errorf("%s: no jobspec", name)
		}
		v, diags := a.Expr.Value(ctx)
		if diags.HasErrors() {
			return nil, fmt.Errorf("%s: %w", name, diags)
		}
		if v.Type() != cty.String {
			return nil, fmt.Errorf("%s: jobspec is a %s, not a string", name, v.Type().FriendlyName())
		}
		spec := exampleJobspec{Name: name, Body: []byte(v.AsString())}
		for _, hb := range b.Body.Blocks {
			if hb.Type != "hcl2" {
				continue
			}
			if a, ok := hb.Body.Attributes["allow_fs"]; ok {
				v, diags := a.Expr.Value(ctx)
				if diags.HasErrors() {
					return nil, fmt.Errorf("%s: hcl2.allow_fs: %w", name, diags)
				}
				spec.AllowFS = v.True()
			}
			if a, ok := hb.Body.Attributes["vars"]; ok {
				v, diags := a.Expr.Value(ctx)
				if diags.HasErrors() {
					return nil, fmt.Errorf("%s: hcl2.vars: %w", name, diags)
				}
				for k, val := range v.AsValueMap() {
					spec.ArgVars = append(spec.ArgVars, k+"="+val.AsString())
				}
				sort.Strings(spec.ArgVars)
			}
		}
		out = append(out, spec)
	}
	return out, nil
}

// terraformFileFunc is Terraform's file(): a file's contents, a relative
// path taken from the module's directory.
func terraformFileFunc(dir string) function.Function {
	return function.New(&function.Spec{
		Params: []function.Parameter{{Name: "path", Type: cty.String}},
		Type:   function.StaticReturnType(cty.String),
		Impl: func(args []cty.Value, _ cty.Type) (cty.Value, error) {
			p := args[0].AsString()
			if !filepath.IsAbs(p) {
				p = filepath.Join(dir, p)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return cty.NilVal, err
			}
			return cty.StringVal(string(b)), nil
		},
	})
}

// exampleRuntimeVars are the variables a Nomad client offers when it renders
// a task's config: the task's environment (NOMAD_* and the task's env),
// with placeholder values.
func exampleRuntimeVars(job *api.Job, tg *api.TaskGroup, task *api.Task) map[string]cty.Value {
	vars := map[string]cty.Value{}
	for _, n := range []string{
		"NOMAD_ALLOC_DIR", "NOMAD_TASK_DIR", "NOMAD_SECRETS_DIR", "NOMAD_MEMORY_LIMIT", "NOMAD_MEMORY_MAX_LIMIT",
		"NOMAD_CPU_LIMIT", "NOMAD_CPU_CORES", "NOMAD_ALLOC_ID", "NOMAD_SHORT_ALLOC_ID", "NOMAD_ALLOC_NAME",
		"NOMAD_ALLOC_INDEX", "NOMAD_TASK_NAME", "NOMAD_GROUP_NAME", "NOMAD_JOB_ID", "NOMAD_JOB_NAME",
		"NOMAD_JOB_PARENT_ID", "NOMAD_DC", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_PARENT_CGROUP",
	} {
		vars[n] = cty.StringVal("<" + n + ">")
	}
	meta := []string{}
	for _, m := range []map[string]string{job.Meta, tg.Meta, task.Meta} {
		for k := range m {
			meta = append(meta, k)
		}
	}
	if p := job.ParameterizedJob; p != nil {
		meta = append(meta, p.MetaRequired...)
		meta = append(meta, p.MetaOptional...)
	}
	for _, k := range meta {
		for _, n := range []string{"NOMAD_META_" + k, "NOMAD_META_" + strings.ToUpper(k)} {
			vars[n] = cty.StringVal("<" + n + ">")
		}
	}
	for k := range task.Env {
		vars[k] = cty.StringVal("<" + k + ">")
	}
	return vars
}

// decodeSandboxConfig renders a sandbox task's config the way the Nomad
// client does (the driver's schema, the task's variables) and decodes it
// into the driver's TaskConfig.
func decodeSandboxConfig(job *api.Job, tg *api.TaskGroup, task *api.Task) (*driver.TaskConfig, error) {
	d := driver.New(hclog.NewNullLogger())
	defer d.Shutdown()
	schema, err := d.TaskConfigSchema()
	if err != nil {
		return nil, err
	}
	spec, diags := hclspecutils.Convert(schema)
	if diags.HasErrors() {
		return nil, diags
	}
	val, diags, errs := hclutils.ParseHclInterface(task.Config, spec, exampleRuntimeVars(job, tg, task))
	if diags.HasErrors() {
		return nil, fmt.Errorf("the client would refuse the task config (Failed Validation): %v", errs)
	}
	var tc drivers.TaskConfig
	if err := tc.EncodeDriverConfig(val); err != nil {
		return nil, err
	}
	var cfg driver.TaskConfig
	if err := tc.DecodeDriverConfig(&cfg); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// exampleRootfsParent is where the examples' absolute rootfs paths must lie:
// the allow_host_rootfs of example-jobs/agent.hcl, where `make rootfs` puts
// the busybox rootfs.
const exampleRootfsParent = "/var/lib/nomad-sandbox/rootfs"

// knownBadExamples are examples that fail the checks for a reason that is
// reported and not yet fixed: their failure is logged, not fatal. Remove an
// entry once its example is fixed.
var knownBadExamples = map[string]string{}

// Every example jobspec parses in strict mode as the Terraform provider
// parses it, and every sandbox task's config is one the client renders and
// the driver accepts.
func TestExampleJobspecs(t *testing.T) {
	wd, err := os.Getwd()
	must.NoError(t, err)
	specs, err := loadExampleJobspecs(filepath.Dir(wd), nil)
	must.NoError(t, err)
	names := map[string]bool{}
	for _, s := range specs {
		names[s.Name] = true
	}
	for _, want := range []string{
		"example-jobs/hello.nomad.hcl",
		"example-jobs/ci-dispatch.nomad.hcl",
		"example-jobs/zones/pr-check.nomad.hcl",
		"example-jobs/terraform/main.tf#nomad_job.nightly_audit",
		"example-jobs/terraform/main.tf#nomad_job.ci_dispatch",
	} {
		must.True(t, names[want], must.Sprintf("%s was not found among %v", want, names))
	}

	pc, err := driver.PluginConfig{RunscPath: "runsc", RunscRoot: "/run/nomad-sandbox/runsc", StateDir: "/run/nomad-sandbox/tasks",
		ImageDir: "/var/lib/nomad-sandbox/images", AllowHostRootfs: []string{exampleRootfsParent}, DefaultPidsLimit: 1024, MaxPidsLimit: 4096}.Validate()
	must.NoError(t, err)
	for _, s := range specs {
		t.Run(s.Name, func(t *testing.T) {
			job, err := s.parse()
			must.NoError(t, err, must.Sprintf("jobspec:\n%s", s.Body))
			must.NotNil(t, job.ID)
			sandboxTasks := 0
			for _, tg := range job.TaskGroups {
				for _, task := range tg.Tasks {
					if task.Driver != "sandbox" {
						continue
					}
					sandboxTasks++
					err := checkSandboxTask(job, tg, task, pc)
					if why, ok := knownBadExamples[s.Name]; ok && err != nil {
						t.Logf("KNOWN EXAMPLE BUG (not failing the test): task %q: %v; %s", task.Name, err, why)
						continue
					}
					must.NoError(t, err, must.Sprintf("task %q", task.Name))
				}
			}
			must.Positive(t, sandboxTasks, must.Sprint("no task uses the sandbox driver"))
		})
	}

	// The Terraform escapes: the job Nomad receives keeps its runtime
	// variables for the client, and carries Terraform's values.
	for _, s := range specs {
		if s.Name != "example-jobs/terraform/main.tf#nomad_job.nightly_audit" {
			continue
		}
		body := string(s.Body)
		must.StrContains(t, body, "${NOMAD_ALLOC_ID}")
		must.StrNotContains(t, body, "$${")
		must.StrContains(t, body, `rootfs  = "`+exampleRootfsParent+`/busybox"`)
	}
}

// checkSandboxTask renders and validates a sandbox task's config.
func checkSandboxTask(job *api.Job, tg *api.TaskGroup, task *api.Task, pc *driver.Settings) error {
	cfg, err := decodeSandboxConfig(job, tg, task)
	if err != nil {
		return err
	}
	if _, err := cfg.Validate(pc); err != nil {
		return fmt.Errorf("the driver would refuse the task: %w", err)
	}
	if filepath.IsAbs(cfg.Rootfs) && !strings.HasPrefix(cfg.Rootfs, exampleRootfsParent+"/") {
		return fmt.Errorf("rootfs %q is not under %s, the demo's allow_host_rootfs", cfg.Rootfs, exampleRootfsParent)
	}
	return nil
}
