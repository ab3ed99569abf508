package main

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/navidrome/navidrome/plugins/pdk/go/host"
)

// Config keys, as named in manifest.json's config schema. Navidrome hands every
// value to the plugin as a string (non-string JSON values serialized as JSON).
const (
	keyURL                 = "embeddUrl"
	keyToken               = "token"
	keyModel               = "model"
	keyMaxSimilar          = "maxSimilarTracks"
	keyMaxPath             = "maxPathLength"
	keyMaxArtists          = "maxSimilarArtists"
	keyEliminateDuplicates = "eliminateDuplicates"
	keyTimeoutMs           = "timeoutMs"
	keySeedTracks          = "seedTracks"
	keySubsonicUser        = "subsonicUser"
)

// Limits that keep every call well inside Navidrome's 30 s plugin timeout: one
// embedd request may take at most maxTimeout, and a call that makes several
// (album and artist mixes) stops starting new ones once callBudget is spent.
const (
	defaultURL       = "http://127.0.0.1:9002"
	defaultModel     = "muq"
	defaultTimeout   = 5 * time.Second
	maxTimeout       = 10 * time.Second
	callBudget       = 20 * time.Second
	defaultSimilar   = 100
	defaultPath      = 50
	defaultArtists   = 20
	defaultSeeds     = 3
	maxSeeds         = 10
	minPathEndpoints = 2
	// embedd's own bounds (docs/http.md §7)
	maxSimilarLimit = 500
	maxPathLimit    = 200
	maxArtistsLimit = 100
)

var models = map[string]bool{"muq": true, "mert": true, "latent": true}

// settings is the plugin's configuration, read afresh on every call so that an
// edit in Navidrome's plugin page applies without a reload.
type settings struct {
	baseURL             string // without a trailing slash
	token               string
	model               string
	maxSimilar          int
	maxPath             int
	maxArtists          int
	eliminateDuplicates bool
	timeout             time.Duration
	seedTracks          int
	subsonicUser        string
}

// loadSettings reads the configuration; an invalid value is an error naming the
// key, so the operator sees it in Navidrome's log instead of silent defaults.
func loadSettings() (settings, error) {
	s := settings{
		baseURL:             defaultURL,
		model:               defaultModel,
		maxSimilar:          defaultSimilar,
		maxPath:             defaultPath,
		maxArtists:          defaultArtists,
		eliminateDuplicates: true,
		timeout:             defaultTimeout,
		seedTracks:          defaultSeeds,
	}
	if v, ok := configString(keyURL); ok {
		u, err := url.Parse(v)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return s, fmt.Errorf("config %s: %q is not an http(s) URL such as %s", keyURL, v, defaultURL)
		}
		s.baseURL = strings.TrimRight(v, "/")
	}
	if v, ok := configString(keyToken); ok {
		s.token = v
	}
	if v, ok := configString(keyModel); ok {
		if !models[v] {
			return s, fmt.Errorf("config %s: %q is not one of muq, mert, latent", keyModel, v)
		}
		s.model = v
	}
	if v, ok := configString(keySubsonicUser); ok {
		s.subsonicUser = v
	}
	var err error
	if s.maxSimilar, err = configInt(keyMaxSimilar, s.maxSimilar, 1, maxSimilarLimit); err != nil {
		return s, err
	}
	if s.maxPath, err = configInt(keyMaxPath, s.maxPath, minPathEndpoints, maxPathLimit); err != nil {
		return s, err
	}
	if s.maxArtists, err = configInt(keyMaxArtists, s.maxArtists, 1, maxArtistsLimit); err != nil {
		return s, err
	}
	if s.seedTracks, err = configInt(keySeedTracks, s.seedTracks, 1, maxSeeds); err != nil {
		return s, err
	}
	ms, err := configInt(keyTimeoutMs, int(defaultTimeout/time.Millisecond), 100, int(maxTimeout/time.Millisecond))
	if err != nil {
		return s, err
	}
	s.timeout = time.Duration(ms) * time.Millisecond
	if v, ok := configString(keyEliminateDuplicates); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return s, fmt.Errorf("config %s: %q is not true or false", keyEliminateDuplicates, v)
		}
		s.eliminateDuplicates = b
	}
	return s, nil
}

// configString returns a non-blank value; a blank field in the UI means "default".
func configString(key string) (string, bool) {
	v, ok := host.ConfigGet(key)
	v = strings.TrimSpace(v)
	return v, ok && v != ""
}

func configInt(key string, fallback, lo, hi int) (int, error) {
	v, ok := configString(key)
	if !ok {
		return fallback, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return fallback, fmt.Errorf("config %s: %q is not a whole number from %d to %d", key, v, lo, hi)
	}
	return n, nil
}

// clampCount turns Navidrome's requested count into what embedd is asked for:
// Navidrome sends 0 when the client gave none, and a client may ask for more
// than the operator allows.
func clampCount(requested int32, limit int) int {
	n := int(requested)
	if n <= 0 || n > limit {
		return limit
	}
	return n
}
