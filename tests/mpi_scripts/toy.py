"""The tiny learnable problem the multi-process torch scripts share: data, model, flat parameters."""
import torch


def toy_data(seed: int, steps: int):
    """X[step, rank] (16 x 10 inputs) and labels Y[step, rank] a linear map can learn, for 2 ranks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 2, 16, 10, generator=gen)
    return x, (x @ torch.randn(10, 4, generator=gen)).argmax(-1)


def make_model(*hidden: int):
    """An MLP 10 -> hidden... -> 4 with ReLUs, seeded so every rank starts identical."""
    g = torch.Generator().manual_seed(0)
    layers, d = [], 10
    for h in hidden:
        layers += [torch.nn.Linear(d, h), torch.nn.ReLU()]
        d = h
    m = torch.nn.Sequential(*layers, torch.nn.Linear(d, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])
