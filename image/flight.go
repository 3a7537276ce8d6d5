package image

import (
	"context"
	"sync"
)

// flightGroup runs one call per key at a time and hands its result to every
// caller that asked for the key meanwhile. Unlike a plain singleflight, the
// call runs in a context of its own: it keeps the first caller's deadline
// and values, goes on if that caller gives up while others still wait, and
// is cancelled when every caller has given up.
type flightGroup struct {
	mu sync.Mutex
	m  map[string]*flight
}

type flight struct {
	done    chan struct{}
	val     any
	err     error
	waiters int
	cancel  context.CancelFunc
}

// do returns fn's result for key. leader is true for the caller whose call
// started fn. A caller whose ctx ends returns at once while others still
// wait; the last one cancels fn and waits for it to return.
func (g *flightGroup) do(ctx context.Context, key string, fn func(context.Context) (any, error)) (val any, leader bool, err error) {
	g.mu.Lock()
	if g.m == nil {
		g.m = map[string]*flight{}
	}
	f, ok := g.m[key]
	if !ok {
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		if dl, ok := ctx.Deadline(); ok {
			var cancelDL context.CancelFunc
			fctx, cancelDL = context.WithDeadline(fctx, dl)
			prev := cancel
			cancel = func() { cancelDL(); prev() }
		}
		f = &flight{done: make(chan struct{}), cancel: cancel}
		g.m[key] = f
		leader = true
		go func() {
			v, err := fn(fctx)
			g.mu.Lock()
			f.val, f.err = v, err
			if g.m[key] == f {
				delete(g.m, key)
			}
			g.mu.Unlock()
			close(f.done)
			cancel()
		}()
	}
	f.waiters++
	g.mu.Unlock()

	select {
	case <-f.done:
		g.mu.Lock()
		f.waiters--
		g.mu.Unlock()
		return f.val, leader, f.err
	case <-ctx.Done():
		g.mu.Lock()
		f.waiters--
		last := f.waiters == 0
		if last {
			// Nobody wants the result any more; a later caller starts
			// afresh rather than joining a cancelled call.
			f.cancel()
			if g.m[key] == f {
				delete(g.m, key)
			}
		}
		g.mu.Unlock()
		if !last {
			return nil, leader, ctx.Err()
		}
		// The last caller waits for the cancelled call to wind down, so
		// that what it leaves behind is cleaned up when do returns, and
		// reports the error it ended with.
		<-f.done
		if f.err == nil {
			return f.val, leader, nil
		}
		return nil, leader, f.err
	}
}
