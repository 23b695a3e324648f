"""The old home of ``schema_database`` and ``copied_database``: they are ``helpers.scratchdb``'s now.

Import them from ``helpers`` (``from helpers import schema_database``); this module only keeps the
old import path working until every chapter has moved.
"""

from .scratchdb import copied_database, schema_database

__all__ = ["copied_database", "schema_database"]
