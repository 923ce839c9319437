"""The submission checker on untrusted files: every way a `.npy` can be wrong is refused with its
own UserError, nothing is unpickled, and every valid encoding of a valid attack is accepted."""

import io

import numpy as np
import pytest
from helpers import PicklePayload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.evaluation import submission
from common.runtime.errors import UserError

SHAPE = (6, 5)
EPSILON = 0.3
PIXELS = (0.0, 1.0)
X_NAT = np.random.default_rng(0).uniform(0, 1, SHAPE).astype(np.float32)
VALID = np.clip(X_NAT + EPSILON * np.random.default_rng(1).choice([-1.0, 1.0], SHAPE),
                *PIXELS).astype(np.float32)
FILE_SETTINGS = settings(max_examples=60, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


def check(path, x_nat=X_NAT, epsilon=EPSILON, pixels=PIXELS):
    return submission.load_and_check(str(path), x_nat, epsilon, pixels, "(6,5)")


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def refused(path, *expected_parts, **check_arguments):
    with pytest.raises(UserError) as error:
        check(path, **check_arguments)
    message = str(error.value)
    assert "\n" not in message
    for part in expected_parts:
        assert part in message, message
    return message


def test_a_valid_submission_is_accepted_as_float32(tmp_path):
    np.save(tmp_path / "attack.npy", VALID)
    result = check(tmp_path / "attack.npy")
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, VALID)


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is not a file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("pixel,value\n0,0.5\n"), "is not a valid .npy file"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x09\x00" + b"\x00" * 50), "is not a valid .npy file"),
    (lambda p: p.write_bytes(npy_bytes(VALID)[:-7]),
     "is truncated: its header needs 120 bytes of data, the file holds 113"),
    (lambda p: p.write_bytes(npy_bytes(VALID) + b"tail"), "is longer than its array"),
    (lambda p: p.write_bytes(npy_bytes(VALID.astype(np.complex64))),
     "Invalid data type: expected real numbers, found complex64"),
    (lambda p: p.write_bytes(npy_bytes(VALID > 0.5)),
     "Invalid data type: expected real numbers, found bool"),
    (lambda p: p.write_bytes(npy_bytes(VALID.astype("U3"))), "found <U3"),
    (lambda p: p.write_bytes(npy_bytes((VALID * 0).astype("m8[s]"))),
     "Invalid data type: expected real numbers, found timedelta64[s]"),
    (lambda p: p.write_bytes(npy_bytes(VALID[:5])), "Invalid shape: expected (6,5), found (5, 5)"),
    (lambda p: p.write_bytes(npy_bytes(VALID.ravel())), "found (30,)"),
])
def test_bad_files_are_refused_each_with_its_own_message(tmp_path, make, expected):
    path = tmp_path / "attack.npy"
    make(path)
    refused(path, expected)


def test_a_header_declaring_terabytes_is_refused_before_reading(tmp_path):
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12, 784)}
    path = tmp_path / "attack.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
    refused(path, "Invalid shape: expected (6,5), found (1000000000000, 784)")


def test_an_oversized_header_is_refused_unparsed(tmp_path):
    path = tmp_path / "attack.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 5), " + " " * 70000 + "}\n"
    path.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little")
                     + header.encode("latin1"))
    refused(path, f"is not a valid .npy file: Header info length ({len(header)}) is large")


def test_a_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "attack.npy"
    payload = np.empty(SHAPE, dtype=object)
    payload[...] = PicklePayload(str(marker))
    path.write_bytes(npy_bytes(payload))
    refused(path, "holds Python objects (it would need pickle): refused")
    assert not marker.exists()


@pytest.mark.parametrize("value, expected", [
    (np.nan, "Invalid pixel value: nan at index (2, 3)"),
    (np.inf, "Invalid pixel range. Expected [0, 1], found [0.0, inf]; the first is inf at "
             "index (2, 3)"),
    (-np.inf, "the first is -inf at index (2, 3)"),
    (1.5, "Invalid pixel range. Expected [0, 1], found"),
])
def test_bad_values_are_named_with_their_index(tmp_path, value, expected):
    bad = VALID.copy()
    bad[0, 0] = 0.0
    bad[2, 3] = value
    np.save(tmp_path / "attack.npy", bad)
    refused(tmp_path / "attack.npy", expected)


def test_the_tolerances_are_the_originals(tmp_path):
    x_nat = np.full(SHAPE, 0.5, np.float32)
    inside = np.full(SHAPE, 0.5 + EPSILON + 0.9e-4)
    np.save(tmp_path / "inside.npy", inside)
    check(tmp_path / "inside.npy", x_nat=x_nat)
    np.save(tmp_path / "outside.npy", np.full(SHAPE, 0.5 + EPSILON + 1.1e-4))
    refused(tmp_path / "outside.npy", "maximum perturbation found: 0.30011", "allowed: 0.3",
            "index (0, 0)", x_nat=x_nat)
    np.save(tmp_path / "range.npy", np.full(SHAPE, 1.00009))
    check(tmp_path / "range.npy", x_nat=np.ones(SHAPE, np.float32))


@FILE_SETTINGS
@given(dtype=st.sampled_from(["<f4", ">f4", "<f8", ">f8", np.longdouble]),
       fortran=st.booleans())
def test_any_float_encoding_of_a_valid_attack_scores_the_same(tmp_path, dtype, fortran):
    encoded = np.asarray(VALID, dtype=dtype, order="F" if fortran else "C")
    path = tmp_path / "attack.npy"
    np.save(path, encoded)
    np.testing.assert_array_equal(check(path), VALID)


@FILE_SETTINGS
@given(dtype=st.sampled_from(["u1", "<i2", ">i2", "<i4", ">u4", "<i8", ">i8", "f2"]),
       fortran=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_integer_pixels_in_any_encoding_score_the_same(tmp_path, dtype, fortran, seed):
    rng = np.random.default_rng(seed)
    x_nat = rng.integers(0, 256, SHAPE).astype(np.float32)
    x_adv = np.clip(x_nat + rng.integers(-8, 9, SHAPE), 0, 255)
    path = tmp_path / "attack.npy"
    np.save(path, np.asarray(x_adv, dtype=dtype, order="F" if fortran else "C"))
    result = check(path, x_nat=x_nat, epsilon=8.0, pixels=(0.0, 255.0))
    np.testing.assert_array_equal(result, x_adv.astype(np.float32))


@FILE_SETTINGS
@given(index=st.tuples(st.integers(0, SHAPE[0] - 1), st.integers(0, SHAPE[1] - 1)),
       change=st.sampled_from(["nan", "inf", "-inf", "above", "below", "far"]))
def test_one_bad_pixel_anywhere_is_found_and_named(tmp_path, index, change):
    bad = VALID.astype(np.float64)
    bad[index] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "above": 1.01, "below": -0.01,
                  "far": X_NAT[index] + (0.35 if X_NAT[index] < 0.5 else -0.35)}[change]
    np.save(tmp_path / "attack.npy", bad)
    message = refused(tmp_path / "attack.npy", f"at index {index}")
    expected = {"nan": "Invalid pixel value", "far": "maximum perturbation found"}
    assert message.startswith(expected.get(change, "Invalid pixel range"))


@FILE_SETTINGS
@given(data=st.data())
def test_mangled_files_are_refused_or_valid_never_a_crash(tmp_path, data):
    original = npy_bytes(VALID)
    mangled = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        mangled[data.draw(st.integers(0, len(mangled) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mangled)))
    path = tmp_path / "attack.npy"
    path.write_bytes(bytes(mangled[:cut]))
    try:
        result = check(path)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert result.shape == SHAPE and np.all(np.isfinite(result))
    assert np.all(np.abs(result.astype(np.float64) - X_NAT) <= EPSILON + submission.TOLERANCE)

