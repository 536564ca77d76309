"""A small text data set of variable-length token sequences, as a tokenizer without padding
returns them: the loader pads them and builds their attention masks (reconfx.data.padding)."""

import torch
from torch.utils.data import Dataset


class Sentences(Dataset):
    """``[CLS] w1 ... wn [SEP]`` with n from 2 to ``longest`` - 2 words; a label per token
    (``ner``: the token id modulo ``tags``) and per sentence (``sentiment``: whether its first
    word id is even; ``topic``: its number of words modulo 3)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = 48, longest: int = 12,
                 tags: int = 9):
        gen = torch.Generator().manual_seed(seed * 3 + ("train", "val", "test").index(split))
        self.items = []
        for _ in range(size):
            n = int(torch.randint(2, longest - 1, (), generator=gen))
            words = torch.randint(1000, 2000, (n,), generator=gen)
            ids = torch.cat([torch.tensor([101]), words, torch.tensor([102])])
            self.items.append(({"input_ids": ids},
                               {"ner": ids % tags, "sentiment": words[0] % 2,
                                "topic": torch.tensor(n % 3)}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def sentences(split: str = "train", seed: int = 0, **kwargs) -> Sentences:
    return Sentences(split, seed, **kwargs)
