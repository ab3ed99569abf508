package embedd

import (
	"context"
	"testing"
)

func TestRecommendRequestAndAnswer(t *testing.T) {
	sock := scriptedPeer(t, func(p *peer) {
		r := p.read()
		if r["op"] != "recommend" {
			t.Errorf("op %v", r["op"])
		}
		seeds, _ := r["seeds"].([]any)
		if len(seeds) != 2 {
			t.Fatalf("seeds %v", r["seeds"])
		}
		first := seeds[0].(map[string]any)
		if first["track_id"] != "a" || first["source"] != "recent" || first["weight"] != 0.5 {
			t.Errorf("seed 0 %v", first)
		}
		second := seeds[1].(map[string]any)
		if vec, ok := second["embedding"].(string); !ok || len(vec) != 8 { // bin, as the loose decoder reads it
			t.Errorf("seed 1 embedding %#v", second["embedding"])
		}
		if r["limit"] != int64(3) || r["diversity"] != 0.25 || r["merge_strategy"] != "priority" {
			t.Errorf("args %v", r)
		}
		if _, present := r["dislike_strength"]; present {
			t.Errorf("dislike_strength sent unset")
		}
		p.write(ok(r["id"], map[string]any{
			"tracks": []any{map[string]any{
				"track_id": "b", "score": 0.9, "reason": "seed:recent", "models": []any{"muq", "latent"},
				"negative_similarity": 0.1, "title": "Song", "artist": "Someone", "album": "", "path": "/m/b.flac",
			}},
			"warnings": []any{"seeds[1]: ..."},
		}))
	})
	c := New(sock, Options{})
	defer c.Close()
	res, err := c.Recommend(context.Background(), RecommendRequest{
		Seeds:         []RecommendSeed{{TrackID: "a", Weight: 0.5, Source: "recent"}, {Embedding: []float32{1, 2}}},
		Limit:         3,
		Diversity:     0.25,
		MergeStrategy: "priority",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Tracks) != 1 || res.Tracks[0].TrackID != "b" || res.Tracks[0].Models[1] != "latent" ||
		res.Tracks[0].NegativeSimilarity == nil || *res.Tracks[0].NegativeSimilarity != 0.1 || len(res.Warnings) != 1 {
		t.Fatalf("answer %+v", res)
	}
}
