//go:build !wasip1

package main

// These tests run natively (go test; the build tag keeps them out of wasip1
// builds): the PDK's non-WASM build replaces every host function with a
// testify mock (host.ConfigMock, host.HTTPMock, host.UsersMock,
// host.SubsonicAPIMock, pdk.PDKMock). The real host is covered by
// tests/test_navidrome_plugin.py, which runs this plugin inside Navidrome.

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/navidrome/navidrome/plugins/pdk/go/host"
	"github.com/navidrome/navidrome/plugins/pdk/go/metadata"
	"github.com/navidrome/navidrome/plugins/pdk/go/pdk"
	"github.com/navidrome/navidrome/plugins/pdk/go/sonicsimilarity"
	"github.com/navidrome/navidrome/plugins/pdk/go/types"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/mock"
	"github.com/stretchr/testify/require"
)

// setup clears every host mock and installs a configuration (unset keys: absent).
func setup(t *testing.T, config map[string]string) {
	t.Helper()
	for _, m := range []*mock.Mock{&host.ConfigMock.Mock, &host.HTTPMock.Mock, &host.UsersMock.Mock, &host.SubsonicAPIMock.Mock} {
		m.ExpectedCalls, m.Calls = nil, nil
	}
	pdk.ResetMock()
	pdk.PDKMock.On("Log", mock.Anything, mock.Anything).Maybe()
	for k, v := range config {
		host.ConfigMock.On("Get", k).Return(v, true)
	}
	host.ConfigMock.On("Get", mock.Anything).Return("", false)
	now = time.Now
	t.Cleanup(func() { now = time.Now })
}

var baseConfig = map[string]string{keyURL: "http://embedd:9002/", keyToken: "s3cret"}

func respond(status int32, body string) *host.HTTPResponse {
	return &host.HTTPResponse{StatusCode: status, Body: []byte(body)}
}

// sent returns the requests the plugin made, parsed.
func sent(t *testing.T) []host.HTTPRequest {
	t.Helper()
	var out []host.HTTPRequest
	for _, c := range host.HTTPMock.Calls {
		out = append(out, c.Arguments.Get(0).(host.HTTPRequest))
	}
	return out
}

func query(t *testing.T, r host.HTTPRequest) (string, url.Values) {
	t.Helper()
	u, err := url.Parse(r.URL)
	require.NoError(t, err)
	return u.Scheme + "://" + u.Host + u.Path, u.Query()
}

const twoHits = `[{"item_id":"t2","title":"Iron Bell","author":"Kestrel","album":"Field Notes","distance":0.25},
 {"item_id":"t3","title":"Paper Boats","author":"The Quiet Hours","album":"Harbour","distance":0.5}]`

func TestSonicSimilarTracksAsksEmbeddAndMapsItsAnswer(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, twoHits), nil)

	got, err := agent{}.GetSonicSimilarTracks(sonicsimilarity.GetSonicSimilarTracksRequest{Song: types.SongRef{ID: "t1"}, Count: 2})
	require.NoError(t, err)

	reqs := sent(t)
	require.Len(t, reqs, 1)
	endpoint, q := query(t, reqs[0])
	assert.Equal(t, "http://embedd:9002/api/similar_tracks", endpoint)
	assert.Equal(t, url.Values{"item_id": {"t1"}, "n": {"2"}, "model": {"muq"}, "eliminate_duplicates": {"true"}}, q)
	assert.Equal(t, "Bearer s3cret", reqs[0].Headers["Authorization"])
	assert.Equal(t, "GET", reqs[0].Method)
	assert.Equal(t, int32(5000), reqs[0].TimeoutMs)

	require.Len(t, got.Matches, 2)
	assert.Equal(t, types.SongRef{ID: "t2", Name: "Iron Bell", Album: "Field Notes", Artists: []types.ArtistRef{{Name: "Kestrel"}}}, got.Matches[0].Song)
	assert.InDelta(t, 0.75, got.Matches[0].Similarity, 1e-9)
	assert.InDelta(t, 0.5, got.Matches[1].Similarity, 1e-9)
}

func TestUnknownTrackIsAnEmptyAnswer(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(404, `{"error":"track 'x' has no stored vector in 'embedding'","code":"not_found"}`), nil)

	sonic, err := agent{}.GetSonicSimilarTracks(sonicsimilarity.GetSonicSimilarTracksRequest{Song: types.SongRef{ID: "x"}})
	require.NoError(t, err)
	assert.Empty(t, sonic.Matches)

	mix, err := agent{}.GetSimilarSongsByTrack(metadata.SimilarSongsByTrackRequest{ID: "x", Count: 5})
	require.NoError(t, err)
	assert.Empty(t, mix.Songs)

	path, err := agent{}.FindSonicPath(sonicsimilarity.FindSonicPathRequest{StartSong: types.SongRef{ID: "x"}, EndSong: types.SongRef{ID: "y"}})
	require.NoError(t, err)
	assert.Empty(t, path.Matches)

	artists, err := agent{}.GetSimilarArtists(metadata.SimilarArtistsRequest{Name: "Nobody"})
	require.NoError(t, err)
	assert.Empty(t, artists.Artists)
}

func TestEmbeddUnreachableIsAnErrorNamingTheURL(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return((*host.HTTPResponse)(nil), errors.New("dial tcp: connection refused"))

	_, err := agent{}.GetSonicSimilarTracks(sonicsimilarity.GetSonicSimilarTracksRequest{Song: types.SongRef{ID: "t1"}})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "http://embedd:9002")
	assert.Contains(t, err.Error(), "connection refused")
}

func TestEmbeddErrorStatusCarriesItsSentence(t *testing.T) {
	for _, tc := range []struct {
		status int32
		body   string
		want   string
	}{
		{401, `{"error": "this route requires 'Authorization: Bearer <token>' (see --http-token)", "code": "forbidden"}`, "see --http-token"},
		{400, `{"error": {"code": "bad_request", "message": "n must be <= 1000"}}`, "n must be <= 1000"},
		{503, `{"message": "overloaded"}`, "overloaded"},
		{502, `<html>bad gateway</html>`, `"<html>bad gateway</html>"`},
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			setup(t, baseConfig)
			host.HTTPMock.On("Send", mock.Anything).Return(respond(tc.status, tc.body), nil)
			_, err := agent{}.GetSimilarSongsByTrack(metadata.SimilarSongsByTrackRequest{ID: "t1"})
			var apiErr *apiError
			require.ErrorAs(t, err, &apiErr)
			assert.Equal(t, tc.status, apiErr.status)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestUnreadableAnswerIsAnError(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `{"not": "a list"}`), nil)
	_, err := agent{}.GetSimilarSongsByTrack(metadata.SimilarSongsByTrackRequest{ID: "t1"})
	require.ErrorContains(t, err, "cannot read")
}

func TestInvalidConfigIsAnErrorNamingTheKey(t *testing.T) {
	for key, value := range map[string]string{
		keyURL:                 "ftp://embedd",
		keyModel:               "clap",
		keyMaxSimilar:          "0",
		keyMaxPath:             "201",
		keyTimeoutMs:           "lots",
		keyEliminateDuplicates: "maybe",
		keySeedTracks:          "11",
	} {
		t.Run(key, func(t *testing.T) {
			setup(t, map[string]string{key: value})
			_, err := agent{}.GetSonicSimilarTracks(sonicsimilarity.GetSonicSimilarTracksRequest{Song: types.SongRef{ID: "t1"}})
			require.ErrorContains(t, err, "config "+key)
			assert.Empty(t, host.HTTPMock.Calls, "no request with a bad configuration")
		})
	}
}

func TestDefaultsWithoutAnyConfig(t *testing.T) {
	setup(t, nil)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `[]`), nil)
	_, err := agent{}.GetSonicSimilarTracks(sonicsimilarity.GetSonicSimilarTracksRequest{Song: types.SongRef{ID: "t1"}})
	require.NoError(t, err)
	r := sent(t)[0]
	endpoint, q := query(t, r)
	assert.Equal(t, defaultURL+"/api/similar_tracks", endpoint)
	assert.Equal(t, "100", q.Get("n"), "count 0 means the configured maximum")
	assert.NotContains(t, r.Headers, "Authorization")
}

func TestCountIsCappedByConfig(t *testing.T) {
	setup(t, map[string]string{keyMaxSimilar: "7", keyMaxPath: "4", keyModel: "latent", keyEliminateDuplicates: "false", keyTimeoutMs: "1500"})
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `{"path": []}`), nil).Once()
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `[]`), nil)

	_, err := agent{}.FindSonicPath(sonicsimilarity.FindSonicPathRequest{StartSong: types.SongRef{ID: "a"}, EndSong: types.SongRef{ID: "b"}, Count: 1000})
	require.NoError(t, err)
	_, err = agent{}.GetSimilarSongsByTrack(metadata.SimilarSongsByTrackRequest{ID: "a", Count: 1000})
	require.NoError(t, err)

	reqs := sent(t)
	_, q := query(t, reqs[0])
	assert.Equal(t, url.Values{"start_song_id": {"a"}, "end_song_id": {"b"}, "count": {"4"}, "model": {"latent"}}, q)
	_, q = query(t, reqs[1])
	assert.Equal(t, "7", q.Get("n"))
	assert.Equal(t, "false", q.Get("eliminate_duplicates"))
	assert.Equal(t, int32(1500), reqs[1].TimeoutMs)
}

func TestSonicPathKeepsEmbeddsOrder(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `{"path": [
		{"item_id":"a","title":"A","author":"X","album":"1","distance":0},
		{"item_id":"m","title":"M","author":"Y","album":"2","distance":0.1},
		{"item_id":"b","title":"B","author":"Z","album":"3","distance":0.2}], "total_distance": 0.3}`), nil)
	got, err := agent{}.FindSonicPath(sonicsimilarity.FindSonicPathRequest{StartSong: types.SongRef{ID: "a"}, EndSong: types.SongRef{ID: "b"}, Count: 3})
	require.NoError(t, err)
	var ids []string
	for _, m := range got.Matches {
		ids = append(ids, m.Song.ID)
	}
	assert.Equal(t, []string{"a", "m", "b"}, ids)
	assert.InDelta(t, 0.9, got.Matches[1].Similarity, 1e-9)
}

func TestSimilarArtistsLeavesOutTheArtistItself(t *testing.T) {
	setup(t, baseConfig)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `[
		{"artist":"Aurora Lane","artist_id":"ar1","divergence":0.1},
		{"artist":"Kestrel","artist_id":"ar2","divergence":0.2},
		{"artist":"The Quiet Hours","artist_id":null,"divergence":0.3}]`), nil)
	got, err := agent{}.GetSimilarArtists(metadata.SimilarArtistsRequest{ID: "ar2", Name: "Kestrel", Limit: 3})
	require.NoError(t, err)
	assert.Equal(t, []types.ArtistRef{{ID: "ar1", Name: "Aurora Lane"}, {Name: "The Quiet Hours"}}, got.Artists)
	_, q := query(t, sent(t)[0])
	assert.Equal(t, "Kestrel", q.Get("artist"))
	assert.Equal(t, "3", q.Get("n"))
}

func subsonicAlbum(ids ...string) string {
	var songs []string
	for _, id := range ids {
		songs = append(songs, fmt.Sprintf(`{"id":%q}`, id))
	}
	return `{"subsonic-response":{"status":"ok","album":{"id":"al","song":[` + strings.Join(songs, ",") + `]}}}`
}

func TestAlbumMixMergesTheNeighboursOfSpreadSeeds(t *testing.T) {
	setup(t, map[string]string{keyURL: "http://embedd:9002", keySeedTracks: "2"})
	host.UsersMock.On("GetUsers").Return([]host.User{{UserName: "alice"}, {UserName: "bob"}}, nil)
	host.SubsonicAPIMock.On("Call", "getAlbum?id=al&u=alice").Return(subsonicAlbum("s1", "s2", "s3", "s4"), nil)
	// seeds s1 and s3 (spread over 4 tracks); album tracks never come back
	host.HTTPMock.On("Send", mock.MatchedBy(func(r host.HTTPRequest) bool { return strings.Contains(r.URL, "item_id=s1&") })).
		Return(respond(200, `[{"item_id":"s2","distance":0.01},{"item_id":"x","distance":0.3},{"item_id":"y","distance":0.2}]`), nil)
	host.HTTPMock.On("Send", mock.MatchedBy(func(r host.HTTPRequest) bool { return strings.Contains(r.URL, "item_id=s3&") })).
		Return(respond(200, `[{"item_id":"x","distance":0.1},{"item_id":"z","distance":0.4}]`), nil)

	got, err := agent{}.GetSimilarSongsByAlbum(metadata.SimilarSongsByAlbumRequest{ID: "al", Name: "Harbour", Count: 3})
	require.NoError(t, err)
	var ids []string
	for _, s := range got.Songs {
		ids = append(ids, s.ID)
	}
	assert.Equal(t, []string{"x", "y", "z"}, ids, "each track once at its best similarity, seeds and album tracks left out")
	assert.Len(t, host.HTTPMock.Calls, 2)
}

func TestArtistRadioReadsTheArtistsAlbumsAsTheConfiguredUser(t *testing.T) {
	setup(t, map[string]string{keySubsonicUser: "carol", keySeedTracks: "1"})
	host.SubsonicAPIMock.On("Call", "getArtist?id=ar&u=carol").
		Return(`{"subsonic-response":{"status":"ok","artist":{"id":"ar","album":[{"id":"al1"},{"id":"al2"}]}}}`, nil)
	host.SubsonicAPIMock.On("Call", "getAlbum?id=al1&u=carol").Return(subsonicAlbum("s1"), nil)
	host.SubsonicAPIMock.On("Call", "getAlbum?id=al2&u=carol").Return(subsonicAlbum("s2"), nil)
	host.HTTPMock.On("Send", mock.Anything).Return(respond(200, `[{"item_id":"s2","distance":0.1},{"item_id":"q","distance":0.2}]`), nil)

	got, err := agent{}.GetSimilarSongsByArtist(metadata.SimilarSongsByArtistRequest{ID: "ar", Name: "Kestrel", Count: 10})
	require.NoError(t, err)
	require.Len(t, got.Songs, 1)
	assert.Equal(t, "q", got.Songs[0].ID)
	host.UsersMock.AssertNotCalled(t, "GetUsers")
}

func TestAlbumMixWithoutAnAllowedUserIsAnError(t *testing.T) {
	setup(t, baseConfig)
	host.UsersMock.On("GetUsers").Return([]host.User{}, nil)
	_, err := agent{}.GetSimilarSongsByAlbum(metadata.SimilarSongsByAlbumRequest{ID: "al"})
	require.ErrorIs(t, err, errNoUser)
	assert.Empty(t, host.HTTPMock.Calls)
}

func TestSubsonicFailureIsAnError(t *testing.T) {
	setup(t, map[string]string{keySubsonicUser: "alice"})
	host.SubsonicAPIMock.On("Call", "getAlbum?id=gone&u=alice").
		Return(`{"subsonic-response":{"status":"failed","error":{"code":70,"message":"Album not found"}}}`, nil)
	_, err := agent{}.GetSimilarSongsByAlbum(metadata.SimilarSongsByAlbumRequest{ID: "gone"})
	require.ErrorContains(t, err, "Album not found")
}

func TestMixStopsWhenItsTimeBudgetIsSpent(t *testing.T) {
	setup(t, map[string]string{keySubsonicUser: "alice", keySeedTracks: "3"})
	host.SubsonicAPIMock.On("Call", "getAlbum?id=al&u=alice").Return(subsonicAlbum("s1", "s2", "s3"), nil)
	clock := time.Now()
	now = func() time.Time { return clock }
	// every embedd answer takes 17 s: the second seed still starts (3 s left), the third does not
	host.HTTPMock.On("Send", mock.Anything).Run(func(mock.Arguments) { clock = clock.Add(17 * time.Second) }).
		Return(respond(200, `[{"item_id":"x","distance":0.1}]`), nil)

	got, err := agent{}.GetSimilarSongsByAlbum(metadata.SimilarSongsByAlbumRequest{ID: "al", Count: 5})
	require.NoError(t, err)
	assert.Len(t, got.Songs, 1)
	reqs := sent(t)
	require.Len(t, reqs, 2)
	assert.Equal(t, int32(5000), reqs[0].TimeoutMs)
	assert.Equal(t, int32(3000), reqs[1].TimeoutMs, "min(timeout, what is left of the budget)")
}

func TestSpreadPicksAcrossTheList(t *testing.T) {
	assert.Equal(t, []string{"a", "c", "e"}, spread([]string{"a", "b", "c", "d", "e", "f"}, 3))
	assert.Equal(t, []string{"a", "b"}, spread([]string{"a", "b"}, 3))
	assert.Empty(t, spread(nil, 3))
}
