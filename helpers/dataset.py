"""What the seeded data is: for each table, the SELECT that generates its rows on the server.

Every value is a function of (row number, column stream, seed) through PostgreSQL's
``hashint8extended`` (stable across versions: hash partitioning depends on it), so the same
scale and seed give byte-identical tables on every run and every server. Skew is built in:
a few users own many posts (density ~ 1/sqrt(rank)), some posts are soft-deleted, and
``users.country`` determines ``users.region`` (a correlated pair for the planner lessons).
How the rows are loaded is ``helpers.seed``'s; what the workbook owns is ``helpers.ownership``'s.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from psycopg import sql
from sqlalchemy.schema import CreateTable

from . import models

GENERATOR_VERSION = "4"


def schema_version() -> str:
    """Changes whenever the models or the generator change, so stale data is re-seeded."""
    from sqlalchemy.dialects import postgresql

    ddl = "".join(str(CreateTable(t).compile(dialect=postgresql.dialect())) for t in models.Base.metadata.sorted_tables)
    loads = "".join(load.columns + load.select for load in LOADS.values())
    return hashlib.sha1((ddl + loads + GENERATOR_VERSION).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- generation SQL
def uniform_sql(stream: int, row: str = "g") -> str:
    """SQL for the seed's uniform [0, 1) value of row ``row`` (an SQL expression) in column stream ``stream``.

    Deterministic: ``hashint8extended(row, :seed * 1000 + stream)``, so a statement using it binds ``:seed``.
    ``row`` is SQL text of the caller's (a column or an expression), never a user's value.
    """
    return (
        f"((hashint8extended(({row})::bigint, :seed * 1000 + {int(stream)}) & 9223372036854775807)::float8"
        " / 9223372036854775808.0)"
    )


_u = uniform_sql  # short, for the generating SELECTs below


_COUNTRIES = [  # (country, region): skewed towards the first ones
    ("US", "americas"),
    ("DE", "europe"),
    ("IN", "asia"),
    ("GB", "europe"),
    ("BR", "americas"),
    ("FR", "europe"),
    ("JP", "asia"),
    ("CA", "americas"),
    ("NG", "africa"),
    ("AU", "oceania"),
    ("ES", "europe"),
    ("MX", "americas"),
    ("KR", "asia"),
    ("IT", "europe"),
    ("ZA", "africa"),
    ("NL", "europe"),
    ("AR", "americas"),
    ("SE", "europe"),
    ("KE", "africa"),
    ("NZ", "oceania"),
]


@dataclass(frozen=True)
class Load:
    """How one table is generated: its columns and the SELECT producing its rows, in primary-key order.

    ``:users``, ``:seed``, ... are the scale's integer parameters, bound as literals by
    ``_select_sql`` (``COPY (SELECT ...)`` takes no bind parameters).
    """

    columns: str
    select: str


_C_ARR = "ARRAY[" + ",".join(f"'{c}'" for c, _ in _COUNTRIES) + "]"
_R_ARR = "ARRAY[" + ",".join(f"'{r}'" for _, r in _COUNTRIES) + "]"
_T0 = "timestamptz '2024-01-01 00:00:00+00'"

LOADS: dict[str, Load] = {
    "users": Load(
        "id, email, name, region, country, attributes, created_at",
        f"""
        SELECT g,
               CASE WHEN g % 7 = 0 THEN 'User' || g || '@Example.com' ELSE 'user' || g || '@example.com' END,
               'User ' || g,
               ({_R_ARR})[ci], ({_C_ARR})[ci],
               jsonb_build_object('plan', (ARRAY['free','free','free','pro','team'])[1 + floor({_u(2)} * 5)::int],
                                  'newsletter', {_u(3)} < 0.3,
                                  'score', floor({_u(4)} * 100)::int),
               {_T0} + {_u(5)} * interval '365 days'
        FROM (SELECT g, 1 + floor(20 * power({_u(1)}, 2))::int AS ci
              FROM generate_series(1, :users) AS g) s""",
    ),
    "profiles": Load(
        "id, user_id, bio, website",
        f"""
        SELECT g, g, 'Bio of user ' || g || '. ' || repeat('Likes databases. ', 1 + floor({_u(11)} * 5)::int),
               CASE WHEN {_u(12)} < 0.4 THEN 'https://example.com/~' || g END
        FROM generate_series(1, :users) AS g WHERE {_u(10)} < 0.8""",
    ),
    "posts": Load(
        "id, user_id, title, body, published, deleted_at, created_at",
        f"""
        SELECT g, 1 + floor(:users * power({_u(21)}, 2))::int,
               'Post ' || g || ' about ' || (ARRAY['indexes','locks','pools','plans','joins','vacuum'])[1 + g % 6],
               'Post ' || g || E'.\\n' || repeat('Lorem ipsum dolor sit amet, consectetur adipiscing elit. ',
                                                  10 + floor({_u(22)} * 24)::int),
               {_u(23)} < 0.7,
               CASE WHEN {_u(24)} < 0.05 THEN created + interval '30 days' END,
               created
        FROM (SELECT g, {_T0} + (g::float8 / :posts) * interval '730 days' + {_u(25)} * interval '6 hours' AS created
              FROM generate_series(1, :posts) AS g) s""",
    ),
    "comments": Load(
        "id, post_id, user_id, body, created_at",
        f"""
        SELECT g, 1 + floor(:posts * power({_u(31)}, 1.5))::int, 1 + floor(:users * power({_u(32)}, 2))::int,
               'Comment ' || g || ': ' || repeat('nice post ', 1 + floor({_u(33)} * 10)::int),
               {_T0} + {_u(34)} * interval '730 days'
        FROM generate_series(1, :comments) AS g""",
    ),
    "tags": Load(
        "id, name",
        """
        SELECT g, 'tag-' || lpad(g::text, 3, '0') FROM generate_series(1, :tags) AS g""",
    ),
    "post_tags": Load(
        "post_id, tag_id",
        f"""
        SELECT p, (j - 1) * (:tags / 3) + 1 + floor((:tags / 3) * power({_u(42, "p * 3 + j")}, 2))::int
        FROM generate_series(1, :posts) AS p CROSS JOIN generate_series(1, 3) AS j
        WHERE j <= 1 + floor(3 * {_u(41, "p")})""",
    ),
    "products": Load(
        "id, sku, name, price, stock, version",
        f"""
        SELECT g, 'SKU-' || lpad(g::text, 6, '0'), 'Product ' || g,
               round((5 + {_u(51)} * 495)::numeric, 2), floor({_u(52)} * 100)::int, 1
        FROM generate_series(1, :products) AS g""",
    ),
    "order_items": Load(
        "id, order_id, product_id, quantity, unit_price",
        f"""
        SELECT (o - 1) * 4 + j, o, pid, 1 + floor({_u(63, "o * 4 + j")} * 5)::int,
               round((5 + {_u(51, "pid")} * 495)::numeric, 2)
        FROM (SELECT o, j, 1 + floor(:products * power({_u(62, "o * 4 + j")}, 2))::int AS pid
              FROM generate_series(1, :orders) AS o CROSS JOIN generate_series(1, 4) AS j
              WHERE j <= 1 + floor(4 * {_u(61, "o")})) s""",
    ),
    "orders": Load(
        "id, user_id, status, total, created_at",
        f"""
        SELECT g, 1 + floor(:users * power({_u(71)}, 2))::int,
               (ARRAY['paid','paid','paid','shipped','shipped','pending','cancelled'])[1 + floor({_u(72)} * 7)::int],
               coalesce(t.total, 0), {_T0} + (g::float8 / :orders) * interval '730 days'
        FROM generate_series(1, :orders) AS g
        LEFT JOIN (SELECT order_id, sum(quantity * unit_price) AS total FROM order_items GROUP BY order_id) t
               ON t.order_id = g""",
    ),
    "accounts": Load(
        "id, user_id, balance",
        f"""
        SELECT g, g, round((100 + {_u(81)} * 900)::numeric, 2) FROM generate_series(1, :users) AS g""",
    ),
}
# tasks: one per table (create, load, keys, indexes, VACUUM ANALYZE) and one per foreign key
# (after both of its tables); orders reads the committed order_items (its totals)
_LOAD_AFTER = {"orders": ["order_items"]}


def _select_sql(name: str, params: dict[str, int]) -> str:
    """The SELECT generating table ``name``, its ``:name`` parameters bound as SQL literals."""
    parts = re.split(r"(?<![:\w]):(\w+)", LOADS[name].select.strip())  # not the :: of a cast
    composed = [sql.Literal(int(params[part])) if i % 2 else sql.SQL(part) for i, part in enumerate(parts)]
    return sql.Composed(composed).as_string(None)
