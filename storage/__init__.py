"""Storage: the only code that touches the database (the index) and the files (the storage
area). Imports :mod:`config` only."""
