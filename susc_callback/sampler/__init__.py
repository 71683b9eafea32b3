"""Weight-restricted SGLD on a private snapshot: the update rule and chains, frozen-prefix
replay, stacked chains, divergence flags."""
