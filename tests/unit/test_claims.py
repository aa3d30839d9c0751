"""Claims view and claim checks (m2m_client/verify/_claims.py)."""

from __future__ import annotations

from typing import Any

import pytest

from m2m_client.errors import ExpiredToken, InsufficientPermissions, InvalidToken
from m2m_client.verify import Claims
from m2m_client.verify._claims import ClaimsPolicy, check_rights, validate_payload

from ._jwt_factory import AUDIENCE, DROP, ISSUER, NOW, claims, refused


def policy(**overrides: Any) -> ClaimsPolicy:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": frozenset({AUDIENCE}),
        "leeway": 30.0,
        "required": (),
        "roles_claim": "roles",
    }
    options.update(overrides)
    return ClaimsPolicy(**options)


def test_valid_claims_give_a_claims_view() -> None:
    view = validate_payload(claims(), policy(), NOW)
    assert view.subject == "worker@clients"
    assert view.client_id == "worker"
    assert view.scopes == {"read:data", "write:data"}
    assert view.issuer == ISSUER
    assert view.audience == (AUDIENCE,)
    assert view.expires_at == NOW + 3600


@pytest.mark.parametrize("iss", ["https://issuer.test", "https://evil.test/", None, 1])
def test_issuer_must_match_exactly(iss: object) -> None:
    with refused("issuer"):
        validate_payload(claims(iss=iss), policy(), NOW)


@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE], ["other", AUDIENCE]])
def test_audience_string_or_list_passes_when_any_matches(aud: object) -> None:
    assert validate_payload(claims(aud=aud), policy(), NOW).audience[-1] == AUDIENCE


def test_any_of_several_configured_audiences_is_accepted() -> None:
    assert validate_payload(claims(aud="b"), policy(audiences=frozenset({"a", "b"})), NOW)


@pytest.mark.parametrize("aud", ["other", ["other"], []])
def test_wrong_audience_is_rejected(aud: object) -> None:
    with refused("audience"):
        validate_payload(claims(aud=aud), policy(), NOW)


@pytest.mark.parametrize("aud", [DROP, None, 5, {"a": AUDIENCE}, [AUDIENCE, 5], [[AUDIENCE]]])
def test_audience_type_confusion_is_rejected(aud: object) -> None:
    with refused("audience"):
        validate_payload(claims(aud=aud), policy(), NOW)


def test_exp_is_required() -> None:
    with refused("missing_claim"):
        validate_payload(claims(exp=DROP), policy(), NOW)


@pytest.mark.parametrize("exp", ["1700003600", True, [1], float("inf"), float("nan")])
def test_exp_must_be_a_finite_number_not_bool_or_string(exp: object) -> None:
    with refused("claim_type"):
        validate_payload(claims(exp=exp), policy(), NOW)


def test_expiry_honours_leeway_and_raises_expired_token() -> None:
    payload = claims(exp=int(NOW) - 10)
    assert validate_payload(payload, policy(), NOW)
    with pytest.raises(ExpiredToken):
        validate_payload(payload, policy(leeway=0.0), NOW)
    with pytest.raises(ExpiredToken):
        validate_payload(claims(exp=int(NOW) - 30), policy(), NOW)


def test_not_before_honours_leeway() -> None:
    assert validate_payload(claims(nbf=int(NOW) + 20), policy(), NOW)
    with refused("not_yet_valid"):
        validate_payload(claims(nbf=int(NOW) + 31), policy(), NOW)
    with refused("claim_type"):
        validate_payload(claims(nbf="soon"), policy(), NOW)


def test_issued_in_the_future_beyond_leeway_is_rejected() -> None:
    assert validate_payload(claims(iat=int(NOW) + 20), policy(), NOW)
    with refused("not_yet_valid"):
        validate_payload(claims(iat=int(NOW) + 3000), policy(), NOW)


COGNITO = (("token_use", frozenset({"access"})), ("client_id", frozenset({"abc", "def"})))


def cognito_claims(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"aud": DROP, "azp": DROP, "token_use": "access", "client_id": "abc"}
    return claims(**{**fields, **overrides})


def test_expected_claims_equal_to_an_allowed_value_are_accepted() -> None:
    policy_ = policy(audiences=None, expected=COGNITO)
    assert validate_payload(cognito_claims(), policy_, NOW).client_id == "abc"
    assert validate_payload(cognito_claims(client_id="def"), policy_, NOW).client_id == "def"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"token_use": "id"}, "claim_value"),
        ({"client_id": "ghi"}, "claim_value"),
        ({"token_use": DROP}, "missing_claim"),
        ({"client_id": DROP}, "missing_claim"),
        ({"token_use": ["access"]}, "claim_value"),
        ({"token_use": None}, "claim_value"),
    ],
)
def test_expected_claims_that_differ_or_are_missing_are_invalid(
    overrides: dict[str, Any], reason: str
) -> None:
    with refused(reason):
        validate_payload(cognito_claims(**overrides), policy(audiences=None, expected=COGNITO), NOW)


def test_expected_claim_mismatch_message_does_not_echo_the_value() -> None:
    long_value = "x" * 5000
    with pytest.raises(InvalidToken) as info:
        validate_payload(
            cognito_claims(token_use=long_value), policy(audiences=None, expected=COGNITO), NOW
        )
    assert "xxxx" not in str(info.value)
    assert len(str(info.value)) < 100


def test_expected_claims_apply_together_with_the_audience_check() -> None:
    payload = claims(token_use="access", client_id="abc")
    assert validate_payload(payload, policy(expected=COGNITO), NOW)
    with refused("audience"):
        validate_payload(dict(payload, aud="other"), policy(expected=COGNITO), NOW)


def test_without_configured_audiences_aud_is_not_checked() -> None:
    no_aud = policy(audiences=None, expected=COGNITO)
    assert validate_payload(cognito_claims(), no_aud, NOW).audience == ()
    assert validate_payload(cognito_claims(aud="anything"), no_aud, NOW).audience == ("anything",)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"iss": "https://evil.test/"}, InvalidToken, "issuer"),
        ({"exp": int(NOW) - 60}, ExpiredToken, "expired"),
        ({"exp": DROP}, InvalidToken, "exp"),
        ({"nbf": int(NOW) + 600}, InvalidToken, "nbf"),
    ],
)
def test_without_configured_audiences_the_other_claim_checks_still_apply(
    overrides: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        validate_payload(cognito_claims(**overrides), policy(audiences=None, expected=COGNITO), NOW)


def test_required_claims_must_be_present() -> None:
    with refused("missing_claim"):
        validate_payload(claims(), policy(required=("jti",)), NOW)
    assert validate_payload(claims(jti="1"), policy(required=("jti",)), NOW)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scope": DROP, "scp": "a b"}, {"a", "b"}),
        ({"scope": DROP, "scp": ["a", "b"]}, {"a", "b"}),
        ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
        ({"scope": DROP}, set()),
        ({"scope": ["a", "b"]}, {"a", "b"}),
    ],
)
def test_scopes_come_from_scope_or_scp(extra: dict[str, Any], expected: set[str]) -> None:
    assert validate_payload(claims(**extra), policy(), NOW).scopes == expected


def test_client_id_comes_from_azp_client_id_entra_appid_or_okta_cid_in_that_order() -> None:
    assert Claims({"azp": "a", "client_id": "b", "appid": "c", "cid": "d"}).client_id == "a"
    assert Claims({"client_id": "b", "appid": "c", "cid": "d"}).client_id == "b"
    assert Claims({"appid": "c", "cid": "d"}).client_id == "c"
    assert Claims({"cid": "d"}).client_id == "d"
    assert Claims({}).client_id is None


def test_a_non_string_okta_cid_is_invalid() -> None:
    with refused("claim_type"):
        Claims({"cid": ["d"]})


def test_roles_from_auth0_namespaced_claim_keycloak_path_and_entra_roles() -> None:
    ns = "https://api.example.com/roles"
    assert Claims({ns: ["admin"]}, roles_claim=ns).roles == {"admin"}
    keycloak = {"realm_access": {"roles": ["admin", "user"]}}
    assert Claims(keycloak, roles_claim="realm_access.roles").roles == {"admin", "user"}
    assert Claims({"roles": ["Task.Write"]}).roles == {"Task.Write"}
    assert Claims({"realm_access": {}}, roles_claim="realm_access.roles").roles == frozenset()
    assert Claims({}, roles_claim=ns).roles == frozenset()


@pytest.mark.parametrize(
    "payload",
    [
        {"permissions": "read:x"},
        {"permissions": ["a", 1]},
        {"permissions": {"a": 1}},
        {"scp": 5},
        {"roles": [["admin"]]},
        {"azp": 5},
    ],
)
def test_malformed_authorization_claims_reject_the_token(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        Claims(payload)


def test_claims_is_a_read_only_mapping_including_nested_values() -> None:
    view = Claims({"a": 1, "nested": {"list": [1, 2]}, "permissions": ["p"]})
    assert view["a"] == 1
    assert view.get("missing") is None
    assert len(view) == 3
    assert set(view) == {"a", "nested", "permissions"}
    with pytest.raises(TypeError):
        view["nested"]["list"] = []  # type: ignore[index]
    assert view["nested"]["list"] == (1, 2)
    assert not hasattr(view, "__setitem__")
    assert view.to_dict() == {"a": 1, "nested": {"list": [1, 2]}, "permissions": ["p"]}
    assert view.permissions == {"p"}


def test_subject_is_none_when_missing_or_not_a_string() -> None:
    assert Claims({"sub": 5}).subject is None


def test_check_rights_passes_when_everything_is_granted() -> None:
    view = Claims({"scope": "a b", "permissions": ["p"], "roles": ["r"]})
    check_rights(view, scopes=["a"], permissions=["p"], roles=["r"])


def test_check_rights_names_every_missing_item() -> None:
    view = Claims({"scope": "a", "permissions": ["p"], "roles": []})
    with pytest.raises(InsufficientPermissions) as info:
        check_rights(view, scopes=["a", "b"], permissions=["p", "q", "q2"], roles=["admin"])
    assert info.value.required == ("b", "q", "q2", "admin")
    assert info.value.error_code == "insufficient_scope"
    assert "permissions q, q2" in str(info.value)
    assert "role admin" in str(info.value)


# --- issue 9 / 15: claims nobody on this project wrote ----------------------------------


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400), 10**20, 1e300])
def test_out_of_range_dates_are_invalid_not_an_overflow(name: str, value: object) -> None:
    with pytest.raises(InvalidToken) as caught:
        validate_payload(claims(**{name: value}), policy(), NOW)
    assert caught.value.reason == "claim_type"


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_null_nbf_or_iat_is_refused_not_read_as_absent(name: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        validate_payload(claims(**{name: None}), policy(), NOW)
    assert caught.value.reason == "claim_type"


@pytest.mark.parametrize("name", ["sub", "jti"])
@pytest.mark.parametrize("value", [1, True, ["a"], {"a": 1}, None, 1.5])
def test_sub_and_jti_must_be_strings(name: str, value: object) -> None:
    with pytest.raises(InvalidToken) as caught:
        validate_payload(claims(**{name: value}), policy(), NOW)
    assert caught.value.reason == "claim_type"


def test_claims_nested_deeper_than_the_bound_are_invalid_not_a_recursion_error() -> None:
    from m2m_client.verify._claims import MAX_CLAIM_DEPTH

    def nest(depth: int) -> Any:
        value: Any = "x"
        for _ in range(depth):
            value = [value]
        return value

    assert validate_payload(claims(ok=nest(MAX_CLAIM_DEPTH)), policy(), NOW)
    for depth in (MAX_CLAIM_DEPTH + 1, 499, 900):
        with pytest.raises(InvalidToken) as caught:
            validate_payload(claims(deep=nest(depth)), policy(), NOW)
        assert caught.value.reason == "claim_type"


def test_claims_can_be_deep_copied_and_pickled_and_stay_read_only() -> None:
    import copy
    import pickle

    view = validate_payload(
        claims(realm_access={"roles": ["admin"]}, nested={"a": [{"b": 1}]}),
        policy(roles_claim="realm_access.roles"),
        NOW,
    )
    assert copy.deepcopy(view) is view  # immutable: a copy is the object itself
    assert copy.copy(view) is view
    restored = pickle.loads(pickle.dumps(view))
    assert restored == view
    assert restored.roles == {"admin"}
    assert restored.scopes == view.scopes
    assert restored.client_id == "worker"
    assert restored.to_dict() == view.to_dict()
    with pytest.raises(TypeError, match="read-only"):
        restored["nested"]["a"] = 1  # type: ignore[index]
    assert pickle.loads(pickle.dumps(view["nested"])) == {"a": ({"b": 1},)}


@pytest.mark.parametrize(
    ("exc_kwargs", "reason"),
    [
        ({"iss": "https://evil.test/"}, "issuer"),
        ({"aud": "https://other.test"}, "audience"),
        ({"exp": int(NOW) - 100}, "expired"),
        ({"nbf": int(NOW) + 100}, "not_yet_valid"),
        ({"iat": int(NOW) + 100}, "not_yet_valid"),
        ({"exp": DROP}, "missing_claim"),
        ({"scope": 5}, "claim_type"),
    ],
)
def test_every_rejection_carries_a_stable_reason(exc_kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        validate_payload(claims(**exc_kwargs), policy(), NOW)
    assert caught.value.reason == reason


def test_a_bare_string_is_one_permission_or_role_and_scopes_split_on_spaces() -> None:
    view = validate_payload(claims(roles=["admin"], permissions=["read:x"]), policy(), NOW)
    check_rights(view, roles="admin", permissions="read:x", scopes="read:data write:data")
    with pytest.raises(InsufficientPermissions) as caught:
        check_rights(view, roles="a", scopes="read:data other")
    assert caught.value.missing_scopes == ("other",)
    assert caught.value.required == ("other", "a")


def test_required_claims_as_a_bare_string_is_one_claim_name() -> None:
    from m2m_client.verify import TokenVerifier

    from ._jwt_factory import FakeClock, verifier_options

    verifier = TokenVerifier(**verifier_options(FakeClock(), required_claims="sub"))
    assert verifier._core.claims_policy.required == ("sub",)
