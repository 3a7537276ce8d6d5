// Package cleanup undoes a half-finished multi-step operation: each step
// registers its undo, and a success releases them all.
package cleanup

// Cleanup runs its functions in reverse order on Clean unless released.
type Cleanup struct {
	fns []func()
}

// Make returns a Cleanup that will run f first registered.
func Make(f func()) Cleanup { return Cleanup{fns: []func(){f}} }

// Add registers another undo step; it runs before the earlier ones.
func (c *Cleanup) Add(f func()) { c.fns = append(c.fns, f) }

// Clean runs the registered functions, latest first, unless Release ran.
func (c *Cleanup) Clean() {
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
	c.fns = nil
}

// Release forgets the undo steps: the operation succeeded.
func (c *Cleanup) Release() { c.fns = nil }
