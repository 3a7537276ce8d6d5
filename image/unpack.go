package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// OCI whiteouts: ".wh.<name>" deletes <name> from the layers below;
// ".wh..wh..opq" in a directory hides everything the layers below put there.
const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	opaqueWhiteout = ".wh..wh..opq"
	maxID          = 1<<32 - 2
)

// ErrTooBig is in the error of an image over the Store's MaxImageSize.
var ErrTooBig = errors.New("image is too large")

// entryError names the tar entry an extraction error is about.
type entryError struct {
	layer string
	name  string
	err   error
}

func (e *entryError) Error() string { return fmt.Sprintf("entry %q: %v", e.name, e.err) }
func (e *entryError) Unwrap() error { return e.err }

// unpacker applies layers, in order, to one tree. Every file system call
// goes through root (an os.Root on the tree), so nothing outside it can be
// created, changed or read; on top of that, the unpacker itself refuses
// names with ".." or a leading "/", and entries whose parent path runs
// through a symlink, so a symlink a layer made is never followed.
type unpacker struct {
	root     *os.Root
	log      hclog.Logger
	maxBytes int64
	maxFiles int64
	chown    bool

	streamBytes int64 // uncompressed tar bytes read, all layers
	fileBytes   int64 // file contents declared, all layers (covers sparse files)
	files       int64 // tar entries, all layers
	exceeded    error

	dirTimes map[string]time.Time

	// Per layer.
	created map[string]bool // paths this layer made (opaque whiteouts keep them)
	dirs    map[string]bool // paths known to be real directories
}

func newUnpacker(root *os.Root, maxBytes, maxFiles int64, log hclog.Logger) *unpacker {
	return &unpacker{
		root:     root,
		log:      log,
		maxBytes: maxBytes,
		maxFiles: maxFiles,
		chown:    os.Geteuid() == 0,
		dirTimes: map[string]time.Time{},
	}
}

func (u *unpacker) tooBig() error {
	if u.exceeded == nil {
		u.exceeded = fmt.Errorf("%w: more than %d bytes unpacked (the store's max image size)", ErrTooBig, u.maxBytes)
	}
	return u.exceeded
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// apply extracts one uncompressed layer tar.
func (u *unpacker) apply(ctx context.Context, r io.Reader, layer string) error {
	u.created = map[string]bool{}
	u.dirs = map[string]bool{".": true}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if u.exceeded != nil {
				return u.exceeded
			}
			return fmt.Errorf("read tar: %w", err)
		}
		if err := u.entry(hdr, tr); err != nil {
			if u.exceeded != nil {
				return u.exceeded
			}
			return &entryError{layer: layer, name: hdr.Name, err: err}
		}
	}
}

func (u *unpacker) entry(hdr *tar.Header, r io.Reader) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // PAX global header (git archive writes one)
	}
	u.files++
	if u.files > u.maxFiles {
		return fmt.Errorf("more than %d entries in the image (the store's file limit)", u.maxFiles)
	}
	name, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	if base := path.Base(name); strings.HasPrefix(base, whiteoutPrefix) {
		return u.whiteout(name, base)
	}
	if name == "." {
		if hdr.Typeflag != tar.TypeDir {
			return errors.New("the image's root must be a directory")
		}
		return u.attrs(name, hdr, dirMode(hdr.Mode), true)
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		err = u.mkdir(name, hdr)
	case tar.TypeReg, tar.TypeGNUSparse:
		err = u.file(name, hdr, r)
	case tar.TypeSymlink:
		err = u.symlink(name, hdr)
	case tar.TypeLink:
		err = u.hardlink(name, hdr)
	case tar.TypeChar, tar.TypeBlock:
		return fmt.Errorf("device node (%d:%d) refused: images may not carry device files", hdr.Devmajor, hdr.Devminor)
	case tar.TypeFifo:
		u.log.Debug("skipping FIFO in image layer", "entry", hdr.Name)
		return nil
	default:
		return fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	if err != nil {
		return err
	}
	u.created[name] = true
	return nil
}

// cleanName turns a tar entry name into a path relative to the tree's root.
// Absolute names and ".." are refused rather than rewritten: a layer that
// carries them was not made by an image builder.
func cleanName(n string) (string, error) {
	if n == "" {
		return "", errors.New("empty name")
	}
	if strings.HasPrefix(n, "/") {
		return "", errors.New("absolute path refused: entries must be relative to the image root")
	}
	var parts []string
	for _, p := range strings.Split(n, "/") {
		switch p {
		case "", ".":
			continue
		case "..":
			return "", errors.New("path with \"..\" refused: entries must stay inside the image root")
		}
		parts = append(parts, p)
	}
	if len(parts) == 0 {
		return ".", nil
	}
	return strings.Join(parts, "/"), nil
}

// parents makes sure every ancestor of name is a real directory, creating
// missing ones if create is set. It refuses a parent that is a symlink,
// since writing through it would write where the link points. exists is
// false if an ancestor is missing and create is not set.
func (u *unpacker) parents(name string, create bool) (exists bool, err error) {
	dir := path.Dir(name)
	if u.dirs[dir] {
		return true, nil
	}
	cur := ""
	for _, p := range strings.Split(dir, "/") {
		if cur == "" {
			cur = p
		} else {
			cur = cur + "/" + p
		}
		if u.dirs[cur] {
			continue
		}
		fi, err := u.root.Lstat(cur)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if !create {
				return false, nil
			}
			if err := u.root.Mkdir(cur, 0o755); err != nil {
				return false, err
			}
			u.created[cur] = true
		case err != nil:
			return false, err
		case fi.Mode()&fs.ModeSymlink != 0:
			return false, fmt.Errorf("parent %q is a symlink: entries may not be written through symlinks", cur)
		case !fi.IsDir():
			return false, fmt.Errorf("parent %q is not a directory", cur)
		}
		u.dirs[cur] = true
	}
	return true, nil
}

// removeExisting clears name for a new entry. A directory goes with its
// contents, as when a layer replaces a directory by a file or link.
func (u *unpacker) removeExisting(name string) error {
	fi, err := u.root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		u.dirs = map[string]bool{".": true}
		return u.root.RemoveAll(name)
	}
	return u.root.Remove(name)
}

func (u *unpacker) mkdir(name string, hdr *tar.Header) error {
	if _, err := u.parents(name, true); err != nil {
		return err
	}
	fi, err := u.root.Lstat(name)
	switch {
	case err == nil && fi.IsDir():
		// Layers merge into an existing directory.
	case err == nil:
		if err := u.root.Remove(name); err != nil {
			return err
		}
		fallthrough
	case errors.Is(err, fs.ErrNotExist):
		if err := u.root.Mkdir(name, 0o700); err != nil {
			return err
		}
	default:
		return err
	}
	u.dirs[name] = true
	return u.attrs(name, hdr, dirMode(hdr.Mode), true)
}

func (u *unpacker) file(name string, hdr *tar.Header, r io.Reader) error {
	if hdr.Size < 0 {
		return errors.New("negative size")
	}
	u.fileBytes += hdr.Size
	if u.fileBytes > u.maxBytes {
		return u.tooBig()
	}
	if _, err := u.parents(name, true); err != nil {
		return err
	}
	if err := u.removeExisting(name); err != nil {
		return err
	}
	// O_EXCL|O_NOFOLLOW: the name was just cleared; nothing may be
	// followed or reused.
	f, err := u.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	buf := copyBufs.Get().(*[]byte)
	_, err = io.CopyBuffer(struct{ io.Writer }{f}, r, *buf)
	copyBufs.Put(buf)
	if err == nil && u.chown {
		err = chownChecked(hdr, f.Chown)
	}
	if err == nil {
		// Permission bits only: setuid, setgid and sticky are dropped.
		err = f.Chmod(fs.FileMode(hdr.Mode) & fs.ModePerm)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return u.root.Chtimes(name, hdr.ModTime, hdr.ModTime)
}

func (u *unpacker) symlink(name string, hdr *tar.Header) error {
	if hdr.Linkname == "" {
		return errors.New("symlink with an empty target")
	}
	if _, err := u.parents(name, true); err != nil {
		return err
	}
	if err := u.removeExisting(name); err != nil {
		return err
	}
	// The target is stored, never followed here: it may be absolute or
	// contain "..", and is resolved inside the sandbox.
	if err := u.root.Symlink(hdr.Linkname, name); err != nil {
		return err
	}
	if u.chown {
		return chownChecked(hdr, func(uid, gid int) error { return u.root.Lchown(name, uid, gid) })
	}
	return nil
}

func (u *unpacker) hardlink(name string, hdr *tar.Header) error {
	target, err := cleanName(hdr.Linkname)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	if target == "." {
		return errors.New("hardlink to the image root")
	}
	ok, err := u.parents(target, false)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	if !ok {
		return fmt.Errorf("hardlink to %q, which does not exist", hdr.Linkname)
	}
	fi, err := u.root.Lstat(target)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	if fi.IsDir() {
		return fmt.Errorf("hardlink to directory %q", hdr.Linkname)
	}
	if target == name {
		return nil
	}
	if _, err := u.parents(name, true); err != nil {
		return err
	}
	if err := u.removeExisting(name); err != nil {
		return err
	}
	// A link to a symlink links the symlink itself, not its target.
	return u.root.Link(target, name)
}

// whiteout applies ".wh.<name>" or an opaque marker. It removes only from
// the layers below, and never through a symlink.
func (u *unpacker) whiteout(name, base string) error {
	dir := path.Dir(name)
	if base == opaqueWhiteout {
		return u.opaque(dir)
	}
	if strings.HasPrefix(base, whiteoutMeta) {
		// Other aufs metadata (.wh..wh.plnk and the like): nothing to do.
		return nil
	}
	victim := strings.TrimPrefix(base, whiteoutPrefix)
	if victim == "" || victim == "." || victim == ".." {
		return fmt.Errorf("whiteout names no file (%q)", victim)
	}
	target := path.Join(dir, victim)
	ok, err := u.parents(target, false)
	if err != nil || !ok {
		return err
	}
	if u.created[target] {
		// A whiteout hides lower layers only.
		return nil
	}
	if _, err := u.root.Lstat(target); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	u.dirs = map[string]bool{".": true}
	return u.root.RemoveAll(target)
}

// opaque hides the contents of dir that the layers below put there, keeping
// what this layer made.
func (u *unpacker) opaque(dir string) error {
	if dir != "." {
		ok, err := u.parents(dir, false)
		if err != nil || !ok {
			return err
		}
		fi, err := u.root.Lstat(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			return fmt.Errorf("opaque whiteout in %q, which is a symlink", dir)
		}
		if !fi.IsDir() {
			return nil
		}
	}
	u.dirs = map[string]bool{".": true}
	return u.hideLower(dir)
}

func (u *unpacker) hideLower(dir string) error {
	f, err := u.root.Open(dir)
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		p := path.Join(dir, n)
		if !u.created[p] {
			if err := u.root.RemoveAll(p); err != nil {
				return err
			}
			continue
		}
		// Made (or declared again) by this layer: keep it, but what the
		// lower layers put inside it is hidden too.
		if fi, err := u.root.Lstat(p); err == nil && fi.IsDir() {
			if err := u.hideLower(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// attrs sets ownership, mode and (for directories, at the end) times.
func (u *unpacker) attrs(name string, hdr *tar.Header, mode fs.FileMode, dir bool) error {
	if u.chown {
		if err := chownChecked(hdr, func(uid, gid int) error { return u.root.Lchown(name, uid, gid) }); err != nil {
			return err
		}
	}
	if err := u.root.Chmod(name, mode); err != nil {
		return err
	}
	if dir {
		u.dirTimes[name] = hdr.ModTime
	}
	return nil
}

// dirMode keeps a directory's permission, sticky and setgid bits (the
// sticky bit matters on /tmp) and drops setuid.
func dirMode(m int64) fs.FileMode {
	mode := fs.FileMode(m) & fs.ModePerm
	if m&0o1000 != 0 {
		mode |= fs.ModeSticky
	}
	if m&0o2000 != 0 {
		mode |= fs.ModeSetgid
	}
	return mode
}

func chownChecked(hdr *tar.Header, chown func(uid, gid int) error) error {
	if hdr.Uid < 0 || hdr.Uid > maxID || hdr.Gid < 0 || hdr.Gid > maxID {
		return fmt.Errorf("owner %d:%d out of range", hdr.Uid, hdr.Gid)
	}
	return chown(hdr.Uid, hdr.Gid)
}

// finish sets directory times, which creating their contents had changed.
func (u *unpacker) finish() {
	for name, t := range u.dirTimes {
		if fi, err := u.root.Lstat(name); err == nil && fi.IsDir() {
			_ = u.root.Chtimes(name, t, t)
		}
	}
}
