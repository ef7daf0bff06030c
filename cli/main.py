import click

@click.group()
def cli():
    """kdstore"""
