package embedd

import "context"

// RecommendSeed is one seed of a recommendation: a stored track (TrackID),
// a query vector in one model's space (Embedding), one vector per model
// (Embeddings, e.g. an audio file's from EmbedFile) or a text (Text, embedded
// by the daemon through MuQ-MuLan and bridged for mert and latent).
type RecommendSeed struct {
	TrackID    string
	Weight     float64 // 0 means the daemon's default, 1
	Source     string  // "recent", "favorite", "playlist", "text", ... (the reason's word)
	Embedding  []float32
	Embeddings map[string][]float32
	Text       string
}

// RecommendRequest asks for a playlist near the seeds; see docs/protocol.md
// (recommend). Zero values take the daemon's defaults.
type RecommendRequest struct {
	Seeds                 []RecommendSeed
	Limit                 int      // 1..500, default 25
	Models                []string // default ["muq"]
	MergeStrategy         string   // "union" (default), "intersection", "priority"
	ModelPriorities       map[string]int
	MinModelAgreement     int
	Diversity             float64 // 0 (similarity) .. 1 (spread widely)
	ExcludeTrackIDs       []string
	LibraryIDs            []int
	DislikedTrackIDs      []string
	DislikedArtistIDs     []string
	DislikeStrength       *float64 // nil: the daemon's default, 0.5
	NegativePrompts       []string
	NegativePromptPenalty float64 // 0.3..1, 0 means the default 0.85
}

// RecommendedTrack is one track of a recommendation, best first.
type RecommendedTrack struct {
	TrackID            string   `msgpack:"track_id"`
	Score              float64  `msgpack:"score"`
	Reason             string   `msgpack:"reason"`
	Models             []string `msgpack:"models"`
	NegativeSimilarity *float64 `msgpack:"negative_similarity"`
	Path               string   `msgpack:"path"`
	Title              string   `msgpack:"title"`
	Artist             string   `msgpack:"artist"`
	Album              string   `msgpack:"album"`
}

// RecommendResult is the answer to recommend. No usable seed is not an
// error: Tracks is empty and Warnings says why.
type RecommendResult struct {
	Tracks   []RecommendedTrack `msgpack:"tracks"`
	Warnings []string           `msgpack:"warnings"`
}

// Recommend returns tracks near the seeds (the daemon's one recommender, also
// behind the Navidrome fork's POST /playlist/{mode}).
func (c *Client) Recommend(ctx context.Context, req RecommendRequest) (*RecommendResult, error) {
	seeds := make([]map[string]any, 0, len(req.Seeds))
	for _, s := range req.Seeds {
		m := map[string]any{}
		if s.TrackID != "" {
			m["track_id"] = s.TrackID
		}
		if s.Weight != 0 {
			m["weight"] = s.Weight
		}
		if s.Source != "" {
			m["source"] = s.Source
		}
		if s.Embedding != nil {
			m["embedding"] = encodeFloat32LE(s.Embedding)
		}
		if len(s.Embeddings) > 0 {
			per := map[string]any{}
			for model, v := range s.Embeddings {
				per[model] = encodeFloat32LE(v)
			}
			m["embeddings"] = per
		}
		if s.Text != "" {
			m["text"] = s.Text
		}
		seeds = append(seeds, m)
	}
	args := map[string]any{"seeds": seeds}
	set := func(key string, value any, present bool) {
		if present {
			args[key] = value
		}
	}
	set("limit", req.Limit, req.Limit != 0)
	set("models", req.Models, len(req.Models) > 0)
	set("merge_strategy", req.MergeStrategy, req.MergeStrategy != "")
	set("model_priorities", req.ModelPriorities, len(req.ModelPriorities) > 0)
	set("min_model_agreement", req.MinModelAgreement, req.MinModelAgreement != 0)
	set("diversity", req.Diversity, req.Diversity != 0)
	set("exclude_track_ids", req.ExcludeTrackIDs, len(req.ExcludeTrackIDs) > 0)
	set("library_ids", req.LibraryIDs, len(req.LibraryIDs) > 0)
	set("disliked_track_ids", req.DislikedTrackIDs, len(req.DislikedTrackIDs) > 0)
	set("disliked_artist_ids", req.DislikedArtistIDs, len(req.DislikedArtistIDs) > 0)
	if req.DislikeStrength != nil {
		args["dislike_strength"] = *req.DislikeStrength
	}
	set("negative_prompts", req.NegativePrompts, len(req.NegativePrompts) > 0)
	set("negative_prompt_penalty", req.NegativePromptPenalty, req.NegativePromptPenalty != 0)
	var out RecommendResult
	if err := c.call(ctx, c.opts.WorkTimeout, "recommend", args, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
