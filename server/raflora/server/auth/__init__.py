"""Who may call what: the admin token, enrolment credentials and signed client tokens."""

from .authority import Authority
from .credentials import (
    EnrolmentRecord,
    bearer,
    check_secret_format,
    credential_subject,
    new_client_credential,
)
from .tokens import ClientClaims, TokenSigner, load_or_create_key

__all__ = [
    "Authority",
    "ClientClaims",
    "EnrolmentRecord",
    "TokenSigner",
    "bearer",
    "check_secret_format",
    "credential_subject",
    "load_or_create_key",
    "new_client_credential",
]
