"""The attribute rows a conditional checkpoint keeps, and conditions drawn jointly from them."""

import json

import numpy as np
import pytest
import torch

from distvae.attributes import AttributeTable, collect
from distvae.data.shards import read_samples, resolve_shards
from distvae.errors import UserError

SEED = 7


def test_collect_takes_real_rows_at_evenly_spaced_positions(npy32_shards):
    shards = resolve_shards(str(npy32_shards), split="train")
    table = collect(str(npy32_shards), shards, 40, limit=50)
    names = json.loads(npy32_shards.read_text())["attr_names"]
    assert table.names == names and table.rows.shape == (50, 40) and table.rows.dtype == np.uint8
    total = sum(shard.samples for shard in shards)
    every = [(index, json.loads(sample["json"])["attrs"]) for shard in shards
             for index, sample in read_samples(shard.url)]
    expected = [every[i * total // 50][1] for i in range(50)]
    assert table.rows.tolist() == expected
    assert table.rows.tolist() != [row for _, row in every[:50]]  # control: not simply the first 50


def test_draws_agree_with_what_was_given_and_keep_the_joint_distribution(npy32_shards, tmp_path):
    table = collect(str(npy32_shards), resolve_shards(str(npy32_shards)), 40)
    blond, black, male = (table.names.index(n) for n in ("Blond_Hair", "Black_Hair", "Male"))
    print(f"seed {SEED}")
    cond, agreeing = table.draw(table.parse(["Blond_Hair=1"]), 2000, torch.Generator().manual_seed(SEED))
    assert agreeing == int(table.rows[:, blond].sum()) > 0
    assert (cond[:, blond] == 1).all() and (cond[:, black] == 0).all()  # one hair colour at a time, as in the data
    # Control: independent marginals would pair blond with black hair about p(black) of the time.
    p_black = table.rows[:, black].mean()
    assert p_black * 2000 > 50
    # The others follow the rows given blond hair: fewer men than overall (the set draws blond mostly for women).
    assert cond[:, male].mean() < table.rows[:, male].mean() - 0.1
    table.save(tmp_path)
    again = AttributeTable.load(tmp_path)
    assert again.names == table.names and np.array_equal(again.rows, table.rows)
    assert AttributeTable.load(tmp_path / "nowhere") is None


@pytest.mark.parametrize("given, message", [
    (["Blnd=1"], "unknown attribute 'Blnd'; this model knows A, B"),
    (["A=yes"], "give NAME=1 or NAME=0"),
    (["A"], "give NAME=1 or NAME=0"),
    (["A=1", "B=1"], "none of the 2 training attribute rows in the checkpoint has A=1, B=1"),
])
def test_bad_attributes_are_one_line_errors(given, message):
    table = AttributeTable(["A", "B"], np.array([[1, 0], [0, 1]], dtype=np.uint8))
    with pytest.raises(UserError) as error:
        table.draw(table.parse(given), 4, torch.Generator().manual_seed(0))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert table.parse(["A=-1", "B=1"]) == {0: 0, 1: 1}
