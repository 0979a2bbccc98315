import itertools

import pytest

from warden.core import IllegalTransitionError
from warden.registry import DeviceState, check_transition

S = DeviceState
LEGAL = {
    (S.PENDING, S.ACTIVE),
    (S.ACTIVE, S.DISABLED),
    (S.DISABLED, S.ACTIVE),
    (S.ACTIVE, S.QUARANTINED),
    (S.QUARANTINED, S.ACTIVE),
    (S.PENDING, S.DECOMMISSIONED),
    (S.ACTIVE, S.DECOMMISSIONED),
    (S.DISABLED, S.DECOMMISSIONED),
    (S.QUARANTINED, S.DECOMMISSIONED),
}
ALL = list(itertools.product(DeviceState, DeviceState))


@pytest.mark.parametrize(("current", "target"), ALL, ids=[f"{a}->{b}" for a, b in ALL])
def test_every_pair(current: DeviceState, target: DeviceState) -> None:
    if (current, target) in LEGAL:
        check_transition("d1", current, target)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition("d1", current, target)
        assert str(current) in info.value.message
        assert info.value.hint


def test_decommissioned_is_final() -> None:
    for target in DeviceState:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition("d1", S.DECOMMISSIONED, target)
        assert info.value.hint is not None and "decommissioned is final" in info.value.hint
