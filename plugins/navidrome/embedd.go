package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"time"

	"github.com/navidrome/navidrome/plugins/pdk/go/host"
)

// errBudgetSpent ends a multi-request call (album or artist mix) that has used
// its share of Navidrome's 30 s plugin timeout; what was gathered is kept.
var errBudgetSpent = errors.New("embedd: time budget for this call is spent")

// hit is one row of embedd's AudioMuse-AI-compatible answers (docs/http.md §5):
// a Navidrome media_file id with the names embedd stored for it. distance =
// 1 - cosine similarity (to the seed; on a path, to the song before). item_id
// is the id Navidrome's database has now and mbid the MusicBrainz recording id
// (absent when untagged): Navidrome matches by id, then mbid, then title and
// artist.
type hit struct {
	ItemID   string   `json:"item_id"`
	Title    string   `json:"title"`
	Author   string   `json:"author"`
	Album    string   `json:"album"`
	Distance *float64 `json:"distance"`
	MBID     string   `json:"mbid"`
}

// similarity turns embedd's distance back into the [−1, 1] score Navidrome shows.
func (h hit) similarity() float64 {
	if h.Distance == nil {
		return 0
	}
	return 1 - *h.Distance
}

// artistHit is one row of similar_artists: divergence = 1 - the artist's score.
type artistHit struct {
	Artist     string   `json:"artist"`
	ArtistID   string   `json:"artist_id"` // null when embedd's database has none
	Divergence *float64 `json:"divergence"`
}

// embeddClient calls embedd's HTTP API through Navidrome's HTTP host service
// (the only way out of the WebAssembly sandbox). One client serves one plugin
// call: deadline bounds all the requests that call makes together.
type embeddClient struct {
	s        settings
	deadline time.Time
}

// now is the clock the time budget is measured on (a test moves it).
var now = time.Now

func newEmbeddClient(s settings) *embeddClient {
	return &embeddClient{s: s, deadline: now().Add(callBudget)}
}

// apiError is an answer of embedd other than 200 and 404.
type apiError struct {
	route   string
	status  int32
	message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("embedd %s answered HTTP %d: %s", e.route, e.status, e.message)
}

// get sends one GET; found is false when embedd answers 404 (an id or artist
// it has no vectors for), which callers turn into an empty answer.
func (c *embeddClient) get(route string, query url.Values, out any) (found bool, err error) {
	remaining := c.deadline.Sub(now())
	if remaining <= 0 {
		return false, errBudgetSpent
	}
	timeout := min(c.s.timeout, remaining)
	headers := map[string]string{"Accept": "application/json"}
	if c.s.token != "" {
		headers["Authorization"] = "Bearer " + c.s.token
	}
	resp, err := host.HTTPSend(host.HTTPRequest{
		Method:    "GET",
		URL:       c.s.baseURL + route + "?" + query.Encode(),
		Headers:   headers,
		TimeoutMs: int32(timeout / time.Millisecond),
	})
	if err != nil {
		return false, fmt.Errorf("embedd %s at %s unreachable: %w", route, c.s.baseURL, err)
	}
	switch resp.StatusCode {
	case 200:
	case 404:
		return false, nil
	default:
		return false, &apiError{route: route, status: resp.StatusCode, message: errorMessage(resp.Body)}
	}
	if err := json.Unmarshal(resp.Body, out); err != nil {
		return false, fmt.Errorf("embedd %s answered JSON this plugin cannot read: %w", route, err)
	}
	return true, nil
}

// errorMessage pulls the sentence out of embedd's JSON error body, whether the
// error is a string or an object with a message; anything else is shown raw.
func errorMessage(body []byte) string {
	var e struct {
		Error   json.RawMessage `json:"error"`
		Message string          `json:"message"`
	}
	if json.Unmarshal(body, &e) == nil {
		var s string
		if json.Unmarshal(e.Error, &s) == nil && s != "" {
			return s
		}
		var obj struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		}
		if json.Unmarshal(e.Error, &obj) == nil && obj.Message != "" {
			return obj.Message
		}
		if e.Message != "" {
			return e.Message
		}
	}
	const limit = 300
	if len(body) > limit {
		body = body[:limit]
	}
	return strconv.Quote(string(body))
}

// similarTracks asks for the n nearest neighbours of one stored track.
func (c *embeddClient) similarTracks(itemID string, n int) ([]hit, error) {
	q := url.Values{
		"item_id":              {itemID},
		"n":                    {strconv.Itoa(n)},
		"model":                {c.s.model},
		"eliminate_duplicates": {strconv.FormatBool(c.s.eliminateDuplicates)},
	}
	var hits []hit
	found, err := c.get("/api/similar_tracks", q, &hits)
	if !found {
		return nil, err
	}
	return hits, nil
}

// findPath asks for a path of count tracks from start to end, both included.
func (c *embeddClient) findPath(startID, endID string, count int) ([]hit, error) {
	q := url.Values{
		"start_song_id": {startID},
		"end_song_id":   {endID},
		"count":         {strconv.Itoa(count)},
		"model":         {c.s.model},
	}
	var answer struct {
		Path []hit `json:"path"`
	}
	found, err := c.get("/api/find_path", q, &answer)
	if !found {
		return nil, err
	}
	return answer.Path, nil
}

// similarArtists asks for artists ranked by how alike their tracks sound;
// artist is a Navidrome artist id or name.
func (c *embeddClient) similarArtists(artist string, n int) ([]artistHit, error) {
	q := url.Values{
		"artist": {artist},
		"n":      {strconv.Itoa(n)},
		"model":  {c.s.model},
	}
	var hits []artistHit
	found, err := c.get("/api/similar_artists", q, &hits)
	if !found {
		return nil, err
	}
	return hits, nil
}
