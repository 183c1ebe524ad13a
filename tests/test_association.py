import pytest
import torch
from torch.testing import assert_close

from winclip.association import associate, text_scores


def test_association_golden():
    q = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    r = torch.tensor([[0, 1.0, 0], [1.0, 1.0, 0]])
    assert_close(associate(q, r), torch.tensor([[0.146446609, 0.0]]))


def test_association_equals_loop():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(2, 5, 8, generator=g), torch.randn(7, 8, generator=g)
    expected = torch.tensor(
        [[min((1 - torch.cosine_similarity(q[b, n], r[m], dim=0).item()) / 2 for m in range(7)) for n in range(5)]
         for b in range(2)]
    )
    assert_close(associate(q, r), expected)


def test_two_class_is_softmax_over_cosines():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # raw, unnormalised prototypes
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.eye(2)
    expected = torch.softmax(cos / 0.07, dim=-1)[:, 1]
    assert_close(text_scores(e, protos), expected)
    assert_close(text_scores(e, protos)[2], torch.tensor(0.5))


def test_one_class_uses_only_the_normal_prototype():
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    protos = torch.tensor([[1.0, 0.0], [5.0, 5.0]])
    assert_close(text_scores(e, protos, scoring="one_class"), torch.tensor([0.0, 1.0, 0.5]))


def test_unknown_scoring_rejected():
    with pytest.raises(ValueError, match="scoring"):
        text_scores(torch.ones(1, 2), torch.ones(2, 2), scoring="three_class")
