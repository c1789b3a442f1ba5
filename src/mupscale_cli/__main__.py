from mupscale_cli.cli import main

main()
