// Package deploy will hold systemd units, the .deb package and the appliance
// image builder. It contains no Go code beyond this comment.
package deploy
