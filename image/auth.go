package image

import (
	"fmt"
	"net"
	"os"

	"github.com/docker/cli/cli/config"
	"github.com/docker/cli/cli/config/configfile"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// credentials picks the authenticator for a repository: the task's own auth
// if it gave any, else the plugin's docker config file, else none. The
// second result says where the credentials came from, for error messages.
func (s *Store) credentials(repo name.Repository, a *Auth) (authn.Authenticator, string, error) {
	if !a.empty() {
		return authn.FromConfig(authn.AuthConfig{
			Username:      a.Username,
			Password:      a.Password,
			IdentityToken: a.IdentityToken,
			RegistryToken: a.RegistryToken,
		}), "the task's auth", nil
	}
	if s.AuthConfig != "" {
		kc, err := loadKeychain(s.AuthConfig)
		if err != nil {
			return nil, "", err
		}
		au, err := kc.Resolve(repo)
		if err != nil {
			return nil, "", fmt.Errorf("credentials for %s from %s: %w", repo.RegistryStr(), s.AuthConfig, err)
		}
		if au != authn.Anonymous {
			return au, "the plugin's auth config " + s.AuthConfig, nil
		}
	}
	return authn.Anonymous, "", nil
}

// configKeychain is an authn.Keychain over one docker config.json, read from
// the path the operator gave rather than from the process's home directory.
// Credential helpers ("credHelpers", "credsStore") run as
// docker-credential-<name> from the plugin's PATH.
type configKeychain struct {
	cf *configfile.ConfigFile
}

func loadKeychain(path string) (*configKeychain, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("auth config: %w", err)
	}
	defer f.Close()
	cf, err := config.LoadFromReader(f)
	if err != nil {
		return nil, fmt.Errorf("auth config %s: %w", path, err)
	}
	cf.Filename = path
	return &configKeychain{cf: cf}, nil
}

// Resolve looks the repository up first ("registry/repo", as some configs
// key per repository), then its registry. Docker Hub's credentials live
// under the historical key "https://index.docker.io/v1/".
func (k *configKeychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	for _, key := range []string{target.String(), target.RegistryStr()} {
		if key == name.DefaultRegistry {
			key = authn.DefaultAuthKey
		}
		ac, err := k.cf.GetAuthConfig(key)
		if err != nil {
			return nil, err
		}
		if ac.Username == "" && ac.Password == "" && ac.Auth == "" && ac.IdentityToken == "" && ac.RegistryToken == "" {
			continue
		}
		return authn.FromConfig(authn.AuthConfig{
			Username:      ac.Username,
			Password:      ac.Password,
			Auth:          ac.Auth,
			IdentityToken: ac.IdentityToken,
			RegistryToken: ac.RegistryToken,
		}), nil
	}
	return authn.Anonymous, nil
}

// insecureAllowed says whether plain HTTP may be used with a registry.
func (s *Store) insecureAllowed(registry string) bool {
	if s.Insecure != nil {
		return s.Insecure(registry)
	}
	return isLoopback(registry)
}

func isLoopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
