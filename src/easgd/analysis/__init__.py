"""Analytic tools: the stability and variance analysis of the paper's section 6."""
