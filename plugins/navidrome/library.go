package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"

	"github.com/navidrome/navidrome/plugins/pdk/go/host"
)

// errNoUser: the album and artist mixes read an album's tracks through
// Navidrome's Subsonic API, which acts as a user the admin has allowed.
var errNoUser = errors.New("embedd plugin: no Navidrome user is allowed for it (plugin page → Users), so album and artist mixes are off")

// maxArtistAlbums bounds how many albums an artist mix reads its seeds from.
const maxArtistAlbums = 5

// subsonicUser is the configured user, or else the first the plugin may act as.
func subsonicUser(s settings) (string, error) {
	if s.subsonicUser != "" {
		return s.subsonicUser, nil
	}
	users, err := host.UsersGetUsers()
	if err != nil {
		return "", fmt.Errorf("embedd plugin: listing its Navidrome users: %w", err)
	}
	if len(users) == 0 {
		return "", errNoUser
	}
	return users[0].UserName, nil
}

// subsonic calls one Subsonic endpoint inside Navidrome and decodes its payload.
func subsonic(endpoint string, query url.Values, out any) error {
	raw, err := host.SubsonicAPICall(endpoint + "?" + query.Encode())
	if err != nil {
		return fmt.Errorf("navidrome %s: %w", endpoint, err)
	}
	var envelope struct {
		Response json.RawMessage `json:"subsonic-response"`
	}
	if err := json.Unmarshal([]byte(raw), &envelope); err != nil || envelope.Response == nil {
		return fmt.Errorf("navidrome %s: not a Subsonic JSON answer", endpoint)
	}
	var status struct {
		Status string `json:"status"`
		Error  struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(envelope.Response, &status); err != nil {
		return fmt.Errorf("navidrome %s: %w", endpoint, err)
	}
	if status.Status != "ok" {
		return fmt.Errorf("navidrome %s: error %d: %s", endpoint, status.Error.Code, status.Error.Message)
	}
	return json.Unmarshal(envelope.Response, out)
}

// albumTrackIDs lists an album's track ids in album order.
func albumTrackIDs(user, albumID string) ([]string, error) {
	var r struct {
		Album struct {
			Song []struct {
				ID string `json:"id"`
			} `json:"song"`
		} `json:"album"`
	}
	if err := subsonic("getAlbum", url.Values{"u": {user}, "id": {albumID}}, &r); err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(r.Album.Song))
	for _, s := range r.Album.Song {
		ids = append(ids, s.ID)
	}
	return ids, nil
}

// artistTrackIDs lists the tracks of an artist's first few albums.
func artistTrackIDs(user, artistID string) ([]string, error) {
	var r struct {
		Artist struct {
			Album []struct {
				ID string `json:"id"`
			} `json:"album"`
		} `json:"artist"`
	}
	if err := subsonic("getArtist", url.Values{"u": {user}, "id": {artistID}}, &r); err != nil {
		return nil, err
	}
	var ids []string
	for i, a := range r.Artist.Album {
		if i == maxArtistAlbums {
			break
		}
		tracks, err := albumTrackIDs(user, a.ID)
		if err != nil {
			return nil, err
		}
		ids = append(ids, tracks...)
	}
	return ids, nil
}

// spread picks up to k ids evenly across the list, so an album mix hears the
// album's beginning, middle and end rather than its first k tracks.
func spread(ids []string, k int) []string {
	if len(ids) <= k {
		return ids
	}
	out := make([]string, 0, k)
	for i := 0; i < k; i++ {
		out = append(out, ids[i*len(ids)/k])
	}
	return out
}
