// Command navidrome is embedd's Navidrome plugin: a WebAssembly module that
// answers Navidrome's Instant Mix, artist radio, similar artists and the
// OpenSubsonic sonic-similarity endpoints from embedd's stored vectors, over
// embedd's HTTP API (a plugin can reach nothing but HTTP).
//
// Build it with scripts/build-plugin, which packages embedd.ndp.
package main

import (
	"github.com/navidrome/navidrome/plugins/pdk/go/metadata"
	"github.com/navidrome/navidrome/plugins/pdk/go/sonicsimilarity"
)

func init() {
	metadata.Register(agent{})
	sonicsimilarity.Register(agent{})
}

// main is required by Go but never runs: the host calls the exported functions.
func main() {}
