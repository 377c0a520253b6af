//! Out-of-band malware scanning of VM disks: partitions, ext4/FAT/NTFS, YARA-X, SHA-256 blocklist

#![forbid(unsafe_code)]
