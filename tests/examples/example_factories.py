"""factory_boy factories for the workbook models: related objects are built automatically."""

from __future__ import annotations

import factory
from factory.alchemy import SQLAlchemyModelFactory

from helpers import models

_SESSION: dict = {"session": None}


def bind(session) -> None:
    """Point every factory at the test's session (the fixture calls this)."""
    _SESSION["session"] = session


class _Base(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_factory = staticmethod(lambda: _SESSION["session"])
        sqlalchemy_session_persistence = "flush"  # ids assigned, nothing committed by the factory


class UserFactory(_Base):
    class Meta:
        model = models.User

    email = factory.Sequence(lambda n: f"user{n}@example.test")
    name = factory.Sequence(lambda n: f"User {n}")
    region = "eu"
    country = "DE"
    attributes = factory.LazyFunction(dict)


class PostFactory(_Base):
    class Meta:
        model = models.Post

    author = factory.SubFactory(UserFactory)
    title = factory.Sequence(lambda n: f"post {n}")
    body = "lorem ipsum " * 20
    published = True


class CommentFactory(_Base):
    class Meta:
        model = models.Comment

    post = factory.SubFactory(PostFactory)
    author = factory.SubFactory(UserFactory)
    body = "nice post"


class ProductFactory(_Base):
    class Meta:
        model = models.Product

    sku = factory.Sequence(lambda n: f"SKU-{n:05d}")
    name = "widget"
    price = 9.99
    stock = 10
