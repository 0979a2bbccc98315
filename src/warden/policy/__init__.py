"""Operator access: roles, actions and API tokens."""

from warden.policy._model import ROLE_ACTIONS, Action, ApiToken, Principal, Role
from warden.policy._ports import PolicyTransactions, PolicyUnitOfWork, TokenStore
from warden.policy._tokens import TokenService, authorize, parse_role

__all__ = [
    "ROLE_ACTIONS",
    "Action",
    "ApiToken",
    "PolicyTransactions",
    "PolicyUnitOfWork",
    "Principal",
    "Role",
    "TokenService",
    "TokenStore",
    "authorize",
    "parse_role",
]
