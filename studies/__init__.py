"""Studies of the method: experiments built on the repository's scripts, each run as python -m studies.NAME."""
