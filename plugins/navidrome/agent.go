package main

import (
	"errors"
	"sort"

	"github.com/navidrome/navidrome/plugins/pdk/go/metadata"
	"github.com/navidrome/navidrome/plugins/pdk/go/pdk"
	"github.com/navidrome/navidrome/plugins/pdk/go/sonicsimilarity"
	"github.com/navidrome/navidrome/plugins/pdk/go/types"
)

// agent answers Navidrome's similarity questions from embedd's vectors.
//
// "Not found" (a track embedd has no vectors for, an unknown artist) is an empty
// answer, so Navidrome falls through to its next agent; an unreachable or
// misconfigured embedd is an error, which Navidrome logs.
type agent struct{}

var (
	_ sonicsimilarity.SonicSimilarity       = agent{}
	_ metadata.SimilarSongsByTrackProvider  = agent{}
	_ metadata.SimilarSongsByAlbumProvider  = agent{}
	_ metadata.SimilarSongsByArtistProvider = agent{}
	_ metadata.SimilarArtistsProvider       = agent{}
)

// songRef is what Navidrome matches a suggestion by: its own id first, then
// MusicBrainz id, then title and artist (which survive an id migration).
func songRef(h hit) types.SongRef {
	ref := types.SongRef{ID: h.ItemID, Name: h.Title, MBID: h.MBID, Album: h.Album}
	if h.Author != "" {
		ref.Artists = []types.ArtistRef{{Name: h.Author}}
	}
	return ref
}

func songRefs(hits []hit) []types.SongRef {
	refs := make([]types.SongRef, 0, len(hits))
	for _, h := range hits {
		refs = append(refs, songRef(h))
	}
	return refs
}

func sonicMatches(hits []hit) sonicsimilarity.SonicSimilarityResponse {
	matches := make([]sonicsimilarity.SonicMatch, 0, len(hits))
	for _, h := range hits {
		matches = append(matches, sonicsimilarity.SonicMatch{Song: songRef(h), Similarity: h.similarity()})
	}
	return sonicsimilarity.SonicSimilarityResponse{Matches: matches}
}

// GetSonicSimilarTracks serves OpenSubsonic getSonicSimilarTracks.
func (agent) GetSonicSimilarTracks(req sonicsimilarity.GetSonicSimilarTracksRequest) (sonicsimilarity.SonicSimilarityResponse, error) {
	s, err := loadSettings()
	if err != nil {
		return sonicsimilarity.SonicSimilarityResponse{}, err
	}
	hits, err := newEmbeddClient(s).similarTracks(req.Song.ID, clampCount(req.Count, s.maxSimilar))
	if err != nil {
		return sonicsimilarity.SonicSimilarityResponse{}, err
	}
	return sonicMatches(hits), nil
}

// FindSonicPath serves OpenSubsonic findSonicPath: start first, end last.
func (agent) FindSonicPath(req sonicsimilarity.FindSonicPathRequest) (sonicsimilarity.SonicSimilarityResponse, error) {
	s, err := loadSettings()
	if err != nil {
		return sonicsimilarity.SonicSimilarityResponse{}, err
	}
	count := max(clampCount(req.Count, s.maxPath), minPathEndpoints)
	hits, err := newEmbeddClient(s).findPath(req.StartSong.ID, req.EndSong.ID, count)
	if err != nil {
		return sonicsimilarity.SonicSimilarityResponse{}, err
	}
	return sonicMatches(hits), nil
}

// GetSimilarSongsByTrack drives a track's Instant Mix (getSimilarSongs2).
func (agent) GetSimilarSongsByTrack(req metadata.SimilarSongsByTrackRequest) (*metadata.SimilarSongsResponse, error) {
	s, err := loadSettings()
	if err != nil {
		return nil, err
	}
	hits, err := newEmbeddClient(s).similarTracks(req.ID, clampCount(req.Count, s.maxSimilar))
	if err != nil {
		return nil, err
	}
	return &metadata.SimilarSongsResponse{Songs: songRefs(hits)}, nil
}

// GetSimilarSongsByAlbum drives an album's Instant Mix: neighbours of a few of
// its tracks, merged.
func (agent) GetSimilarSongsByAlbum(req metadata.SimilarSongsByAlbumRequest) (*metadata.SimilarSongsResponse, error) {
	return mixFromSeeds(req.Count, func(user string) ([]string, error) { return albumTrackIDs(user, req.ID) })
}

// GetSimilarSongsByArtist drives artist radio: neighbours of a few of the
// artist's tracks, merged.
func (agent) GetSimilarSongsByArtist(req metadata.SimilarSongsByArtistRequest) (*metadata.SimilarSongsResponse, error) {
	return mixFromSeeds(req.Count, func(user string) ([]string, error) { return artistTrackIDs(user, req.ID) })
}

// GetSimilarArtists ranks artists by how alike their tracks sound in embedd.
func (agent) GetSimilarArtists(req metadata.SimilarArtistsRequest) (*metadata.SimilarArtistsResponse, error) {
	s, err := loadSettings()
	if err != nil {
		return nil, err
	}
	artist := req.Name // names survive Navidrome's id migrations; embedd takes either
	if artist == "" {
		artist = req.ID
	}
	if artist == "" {
		return &metadata.SimilarArtistsResponse{}, nil
	}
	hits, err := newEmbeddClient(s).similarArtists(artist, clampCount(req.Limit, s.maxArtists))
	if err != nil {
		return nil, err
	}
	artists := make([]types.ArtistRef, 0, len(hits))
	for _, h := range hits {
		if h.Artist != "" && h.Artist != req.Name {
			artists = append(artists, types.ArtistRef{ID: h.ArtistID, Name: h.Artist})
		}
	}
	return &metadata.SimilarArtistsResponse{Artists: artists}, nil
}

// mixFromSeeds asks embedd for the neighbours of a few seed tracks and merges
// them: each track once, at its best similarity, seeds left out, best first.
// A call that runs out of its time budget answers with what it has.
func mixFromSeeds(requested int32, seedsOf func(user string) ([]string, error)) (*metadata.SimilarSongsResponse, error) {
	s, err := loadSettings()
	if err != nil {
		return nil, err
	}
	user, err := subsonicUser(s)
	if err != nil {
		return nil, err
	}
	all, err := seedsOf(user)
	if err != nil {
		return nil, err
	}
	count := clampCount(requested, s.maxSimilar)
	seeds := spread(all, s.seedTracks)
	isSeed := make(map[string]bool, len(all))
	for _, id := range all {
		isSeed[id] = true
	}
	client := newEmbeddClient(s)
	best := map[string]hit{}
	for _, seed := range seeds {
		hits, err := client.similarTracks(seed, count)
		if errors.Is(err, errBudgetSpent) {
			pdk.Log(pdk.LogWarn, "embedd plugin: time budget spent after some seeds; answering with those")
			break
		}
		if err != nil {
			return nil, err
		}
		for _, h := range hits {
			if isSeed[h.ItemID] {
				continue
			}
			if old, ok := best[h.ItemID]; !ok || h.similarity() > old.similarity() {
				best[h.ItemID] = h
			}
		}
	}
	merged := make([]hit, 0, len(best))
	for _, h := range best {
		merged = append(merged, h)
	}
	sort.Slice(merged, func(i, j int) bool {
		if a, b := merged[i].similarity(), merged[j].similarity(); a != b {
			return a > b
		}
		return merged[i].ItemID < merged[j].ItemID
	})
	if len(merged) > count {
		merged = merged[:count]
	}
	return &metadata.SimilarSongsResponse{Songs: songRefs(merged)}, nil
}
