"""`signsgd`: signSGD with majority vote (Bernstein, Wang, Azizzadenesheli, Anandkumar, ICML 2018;
Bernstein, Zhao, Azizzadenesheli, Anandkumar, signSGD with Majority Vote is Communication
Efficient and Fault Tolerant, ICLR 2019).

Each rank sends the sign of its gradient, one bit per entry; the ranks' signs are allgathered
and combined by an elementwise majority vote:

    s_r = sign(g_r)              (packed bits; sign(0) is sent as +1)
    a_r = mean_i |g_r,i|         (scale=mean, the default: one float32 per tensor)
    g~  = mean_r(a_r) * sign( sum_r s_r )      (ties -> 0)

With scale=mean the voted step has the gradient's size (the scaling of EF-signSGD), so the
learning rate of an uncompressed SGD run transfers. scale=<number> is the paper's form: a fixed
magnitude, the learning rate then being the per-coordinate step size. No error feedback in the
paper: `default_memory = "none"`. Wire: 4 + ceil(n/8) bytes (~32x; ceil(n/8) with a fixed scale).
"""
from gradcomp.compressors.signs import SignVoteCompressor


class SignSGDCompressor(SignVoteCompressor):
    name = "signsgd"
    paper = "Bernstein et al. signSGD with Majority Vote is Communication Efficient and Fault Tolerant. ICLR 2019"
