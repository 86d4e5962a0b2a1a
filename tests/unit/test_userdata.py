"""The user-data document: what the provisioner writes, the executor reads back exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falconet.userdata import MAX_BYTES, UserData, UserDataError, parse

DISPATCHER = "tcp://10.0.1.5:5556"

hosts = st.one_of(st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z0-9])?){0,2}", fullmatch=True),
                  st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))
user_data = st.builds(
    UserData,
    dispatcher=st.builds(lambda h, p: f"tcp://{h}:{p}", hosts, st.integers(1, 65535)),
    cluster=st.text(max_size=40),
    launch_token=st.text(max_size=40),
    slots=st.integers(0, 1024),
    idle_timeout_s=st.one_of(st.integers(0, 10**6), st.floats(0, 1e6, allow_nan=False)),
    prefetch=st.integers(-1, 10_000),
    tags=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8),
    shutdown_when_idle=st.booleans(),
)


@given(user_data)
def test_round_trip(ud):
    text = ud.to_json()
    assert parse(text) == ud
    assert parse(text.encode()) == ud
    assert json.loads(text)["falconet"] == 1


def test_defaults_are_left_out_of_the_document():
    assert json.loads(UserData(dispatcher=DISPATCHER).to_json()) == {"falconet": 1, "dispatcher": DISPATCHER}


def test_a_document_beyond_ec2s_limit_is_refused_when_written():
    with pytest.raises(UserDataError, match=str(MAX_BYTES)):
        UserData(dispatcher=DISPATCHER, tags={"big": "x" * MAX_BYTES}).to_json()


def doc(**fields) -> str:
    return json.dumps({"falconet": 1, "dispatcher": DISPATCHER, **fields})


@pytest.mark.parametrize("raw, named", [
    (b"\xff\xfe", "UTF-8"),
    ("", "empty"),
    ("  \n", "empty"),
    ("dispatcher=tcp://x:1", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"dispatcher": DISPATCHER}), "'falconet'"),
    (doc(falconet=2), "'falconet'"),
    (doc(falconet=True), "'falconet'"),
    (doc(falconet=1.0), "'falconet'"),
    (json.dumps({"falconet": 1}), "'dispatcher'"),
    (doc(dispatcher=5556), "'dispatcher'"),
    (doc(dispatcher="10.0.1.5:5556"), "'dispatcher'"),
    (doc(dispatcher="tcp://10.0.1.5"), "'dispatcher'"),
    (doc(dispatcher="tcp://:5556"), "'dispatcher'"),
    (doc(slot=4), "'slot'"),
    (doc(slots="4"), "'slots'"),
    (doc(slots=True), "'slots'"),
    (doc(slots=1.5), "'slots'"),
    (doc(slots=-1), "'slots'"),
    (doc(idle_timeout_s="10"), "'idle_timeout_s'"),
    (doc(idle_timeout_s=-1), "'idle_timeout_s'"),
    (doc(idle_timeout_s=float("nan")), "'idle_timeout_s'"),
    (doc(idle_timeout_s=float("inf")), "'idle_timeout_s'"),
    (doc(prefetch=-2), "'prefetch'"),
    (doc(cluster=7), "'cluster'"),
    (doc(launch_token=None), "'launch_token'"),
    (doc(tags=["a"]), "'tags'"),
    (doc(tags={"site": 1}), "'tags'"),
    (doc(shutdown_when_idle="yes"), "'shutdown_when_idle'"),
    (doc(shutdown_when_idle=1), "'shutdown_when_idle'"),
])
def test_each_error_names_what_is_wrong_in_one_line(raw, named):
    with pytest.raises(UserDataError) as err:
        parse(raw, where="user-data of instance i-0abc")
    message = str(err.value)
    assert named in message and message.startswith("user-data of instance i-0abc")
    assert "\n" not in message


def test_an_unknown_field_lists_the_known_ones():
    with pytest.raises(UserDataError, match="known fields: falconet, dispatcher, cluster"):
        parse(doc(dispatchr="tcp://x:1"))


CLOUD_CONFIG = "#cloud-config\npackages: [python3-venv]\n"


def test_multipart_user_data_carries_the_falconet_part():
    from falconet.userdata import with_cloud_config

    ud = UserData(dispatcher="tcp://10.0.1.5:5556", cluster="stock", slots=3)
    text = with_cloud_config(ud.to_json(), CLOUD_CONFIG)
    assert "text/cloud-config" in text and "text/x-falconet" in text
    assert parse(text) == ud
    assert parse(text.encode()) == ud


def test_cloud_config_alone_or_a_multipart_without_our_part_is_refused():
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    with pytest.raises(UserDataError, match="cloud-config document with no falconet part.*--cloud-init"):
        parse(CLOUD_CONFIG)
    mime = MIMEMultipart()
    mime.attach(MIMEText(CLOUD_CONFIG, "cloud-config"))
    with pytest.raises(UserDataError, match="without a text/x-falconet part"):
        parse(mime.as_string())


def test_cloud_init_template_must_be_cloud_config_and_fit_in_16_kib():
    from falconet.userdata import with_cloud_config

    doc = UserData(dispatcher="tcp://10.0.1.5:5556").to_json()
    with pytest.raises(UserDataError, match="must start with '#cloud-config'"):
        with_cloud_config(doc, "packages: []\n")
    with pytest.raises(UserDataError, match="more than EC2's"):
        with_cloud_config(doc, CLOUD_CONFIG + "#" * 20_000 + "\n")
