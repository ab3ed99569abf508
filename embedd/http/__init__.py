"""The daemon's HTTP face: health, metrics, the original REST API, the similarity API, every op.

Importing this package is cheap (settings validate ``--http`` with
:mod:`embedd.http.address`); aiohttp is imported by :mod:`embedd.http.site`.
"""
