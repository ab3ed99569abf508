"""embedd: the music-embedding daemon for Navidrome's recommender."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
