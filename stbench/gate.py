"""(being written)"""
from .errors import UserError


def add_arguments(parser):
    pass


def execute(args):
    raise UserError("'gate' is not built yet")
