"""The daemon's HTTP face: health, metrics, the original REST API, the similarity API, every op.

Where it listens is parsed below it, in :mod:`embedd.address` (settings validate
``--http`` there, without pulling this package under settings); aiohttp is
imported by :mod:`embedd.http.site`.
"""
