"""Who is asking: a node (its token is HMAC(secret, node_id)), a builder (HMAC(secret,
"builder:" + builder_id)) or the admin.

401: no token, or a token that is neither the admin's nor the named node's.
403: a valid token that is not allowed here (the admin speaking for a node, or a node on an
admin-only endpoint; a node proves who it is there with `X-Node-ID`).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

from imagefactory.tokens import builder_token, node_token, tokens_equal


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or 401."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


class Authority:
    def __init__(self, secret: str, admin_token: str) -> None:
        self._secret = secret
        self._admin_token = admin_token

    def is_admin(self, token: str) -> bool:
        return tokens_equal(token, self._admin_token)

    def is_node(self, token: str, node_id: str) -> bool:
        return tokens_equal(token, node_token(self._secret, node_id))

    def is_builder(self, token: str, builder_id: str) -> bool:
        return tokens_equal(token, builder_token(self._secret, builder_id))

    def require_builder(self, token: str, builder_id: str | None) -> str:
        """Only builder `builder_id` itself (named by X-Builder-ID); returns its id."""
        if builder_id is None:
            raise HTTPException(401, "X-Builder-ID header required with a builder token")
        if self.is_builder(token, builder_id):
            return builder_id
        if self.is_admin(token):
            raise HTTPException(403, "the admin token cannot speak for a builder")
        raise HTTPException(401, f"invalid token for builder {builder_id}")

    def require_node(self, token: str, node_id: str) -> None:
        """Only node `node_id` itself may do this."""
        if self.is_node(token, node_id):
            return
        if self.is_admin(token):
            raise HTTPException(403, "the admin token cannot speak for a node")
        raise HTTPException(401, f"invalid token for node {node_id}")

    def require_admin(self, token: str, claimed_node: str | None) -> None:
        if self.is_admin(token):
            return
        if claimed_node is not None and self.is_node(token, claimed_node):
            raise HTTPException(403, "this endpoint needs the admin token")
        raise HTTPException(401, "invalid admin token")

    def require_node_or_admin(self, token: str, claimed_node: str | None) -> None:
        if self.is_admin(token):
            return
        if claimed_node is None:
            raise HTTPException(401, "X-Node-ID header required with a node token")
        if not self.is_node(token, claimed_node):
            raise HTTPException(401, f"invalid token for node {claimed_node}")
